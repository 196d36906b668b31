"""Rank discovery from each launcher's variables (bigtrain.distributed.env), and Slurm host lists."""

from __future__ import annotations

import builtins

import pytest

from bigtrain.distributed import detect_env
from bigtrain.distributed.hostlist import expand_hostlist
from bigtrain.errors import ConfigError

TORCH = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_STEP_NODELIST": "gpu[08,11]",
        "SLURM_JOB_ID": "123456"}


@pytest.mark.parametrize("extra,launcher", [({"TORCHELASTIC_RUN_ID": "none"}, "torchrun"),
                                            ({"CROSS_RANK": "0"}, "deepspeed"),
                                            ({"TORCHELASTIC_RUN_ID": "x", "ACCELERATE_MIXED_PRECISION": "no"},
                                             "accelerate"),
                                            ({}, "env")])
def test_torch_style_launchers(extra, launcher):
    env = detect_env({**TORCH, **extra})
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, launcher)
    assert (env.master_addr, env.master_port) == ("node7", 29500)
    assert env.torch_env() == TORCH


def test_srun_step():
    """Rank from SLURM_PROCID, local rank from SLURM_LOCALID, the step's first node as rendezvous, the port from
    the job id (every task computes the same); MASTER_ADDR / MASTER_PORT win when exported."""
    env = detect_env(SRUN)
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (5, 1, 8, "slurm")
    assert (env.master_addr, env.master_port) == ("gpu08", 15000 + 123456 % 20000)
    env = detect_env({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 4000)


def test_torchrun_inside_srun_uses_torchrun_ranks():
    """`srun torchrun ...` or the DeepSpeed launcher per node: the per-process variables win over the task's."""
    env = detect_env({**SRUN, **TORCH, "TORCHELASTIC_RUN_ID": "x"})
    assert (env.rank, env.world_size, env.launcher) == (3, 4, "torchrun")


def test_slurm_batch_shell_is_one_process_with_a_note():
    env = detect_env({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "4",
                      "SLURM_JOB_NODELIST": "n1"})
    assert (env.world_size, env.launcher) == (1, "none")
    assert "without srun" in env.note and "SLURM_NTASKS=4" in env.note


def test_mpi_without_mpi4py(monkeypatch):
    """Without mpi4py the launcher's variables give the ranks, and the rendezvous must be exported."""
    real_import = builtins.__import__

    def no_mpi4py(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    mpich = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}
    with pytest.raises(ConfigError, match=r"mpi4py is not installed.*MASTER_ADDR, MASTER_PORT.*install -e \.\[mpi\]"):
        detect_env(mpich)
    env = detect_env({**mpich, "MASTER_ADDR": "h0", "MASTER_PORT": "5000"})
    assert (env.rank, env.local_rank, env.world_size, env.launcher, env.master_port) == (1, 1, 2, "mpi", 5000)
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "MASTER_ADDR": "h0", "MASTER_PORT": "5000"}
    assert detect_env(ompi).rank == 2
    with pytest.raises(ConfigError, match="world size"):
        detect_env({"PMIX_RANK": "0", "MASTER_ADDR": "h0", "MASTER_PORT": "5000"})


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0"}, "sets RANK but not WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "but not RANK"),
    ({**TORCH, "RANK": "x"}, "RANK='x' is not an integer"),
    ({**TORCH, "RANK": "4"}, r"RANK=4 is outside \[0, WORLD_SIZE=4\)"),
    ({"PMI_RANK": "0"}, "sets PMI_RANK but not PMI_SIZE"),
    ({"MV2_COMM_WORLD_RANK": "0"}, "but not MV2_COMM_WORLD_SIZE"),
    ({"OMPI_COMM_WORLD_RANK": "1"}, "but not OMPI_COMM_WORLD_SIZE"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_LOCALID"}, "but not SLURM_LOCALID"),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu[1-", "SLURM_STEP_NODELIST": ""}, "Slurm host list"),
    ({**SRUN, "MASTER_PORT": "auto"}, "MASTER_PORT='auto' is not an integer"),
    ({"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_PORT": "auto"}, "MASTER_PORT='auto' is not an integer"),
])
def test_half_set_or_inconsistent_environment_is_named(env, message):
    with pytest.raises(ConfigError, match=message):
        detect_env(env)


def test_no_launcher_is_one_process():
    """MASTER_ADDR / MASTER_PORT alone (accelerate's one-process launch sets them) do not make a job."""
    env = detect_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.launcher, env.note) == (0, 1, "none", None)


@pytest.mark.parametrize("hostlist,hosts", [
    ("localhost", ["localhost"]),
    ("gpu[07-09,11],login1", ["gpu07", "gpu08", "gpu09", "gpu11", "login1"]),
    ("a[1-2]-b[9-10]", ["a1-b9", "a1-b10", "a2-b9", "a2-b10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu[a-b]", "gpu[3-1]"])
def test_bad_hostlist(bad):
    with pytest.raises(ConfigError, match="Slurm host list"):
        expand_hostlist(bad)
