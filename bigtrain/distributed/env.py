"""Which rank this process is, from whatever started it, and the process group set-up.

One function reads every launcher's environment; the first that matches wins:

    torchrun, DeepSpeed's launcher, accelerate   RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (+ LOCAL_RANK)
    mpirun / mpiexec                             OMPI_COMM_WORLD_*, PMI_RANK/PMI_SIZE, MV2_COMM_WORLD_*, PMIX_RANK;
                                                 the rendezvous through mpi4py (bigtrain.distributed.mpi)
    srun (a Slurm job step)                      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the first host of
                                                 SLURM_STEP_NODELIST is the rendezvous
    nothing                                      one process

MPI comes before Slurm: `mpirun` inside an allocation runs its ranks in srun steps of its own daemons, whose
SLURM_PROCID counts nodes, not ranks. A half-set environment (RANK without WORLD_SIZE, PMI_RANK without
PMI_SIZE, ...) is an error naming the missing variable.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from datetime import timedelta

import torch

from bigtrain.compat.deepspeed import release_shm_buffer
from bigtrain.compat.deepspeed_import import import_deepspeed
from bigtrain.distributed.hostlist import expand_hostlist
from bigtrain.distributed.mpi import mpi_rendezvous
from bigtrain.distributed.rendezvous import MPI_VARS, DistEnv, free_port
from bigtrain.errors import ConfigError

TORCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000  # MASTER_PORT under srun: 15000 + job id mod 20000


def _ints(env: Mapping[str, str], names: dict[str, str | None]) -> dict[str, int]:
    """The named variables as integers (an unset optional one is left out)."""
    out = {}
    for key, name in names.items():
        if name is None or name not in env:
            continue
        try:
            out[key] = int(env[name])
        except ValueError:
            raise ConfigError(f"{name}={env[name]!r} is not an integer; the launcher sets it to this process's "
                              f"{key.replace('_', ' ')}. Unset it, or start the job through the launcher.") from None
    return out


def _check_rank(rank: int, world: int, rank_var: str, world_var: str) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"{rank_var}={rank} is outside [0, {world_var}={world}): the launcher's variables "
                          f"disagree. Start the job through the launcher, or unset them to run as one process.")


def _missing(env: Mapping[str, str], required: tuple[str, ...], present_hint: str, fix: str) -> None:
    missing = [k for k in required if k not in env]
    if missing:
        raise ConfigError(f"The environment sets {present_hint} but not {', '.join(missing)}: {fix}")


def _torch_launcher_name(env: Mapping[str, str]) -> str:
    if any(k.startswith("ACCELERATE_") for k in env):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env or "DS_ACCELERATOR" in env or "PDSH_RCMD_TYPE" in env:
        return "deepspeed"
    return "env"


def _from_torch_vars(env: Mapping[str, str]) -> DistEnv:
    present = [k for k in TORCH_VARS if k in env]
    _missing(env, TORCH_VARS, ", ".join(present),
             f"a launcher (torchrun, deepspeed, accelerate) sets all of {', '.join(TORCH_VARS)}. Start the job "
             f"through a launcher, export the missing variable, or unset {', '.join(present)} to run as one "
             f"process.")
    v = _ints(env, {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
                    "master_port": "MASTER_PORT"})
    _check_rank(v["rank"], v["world_size"], "RANK", "WORLD_SIZE")
    return DistEnv(rank=v["rank"], local_rank=v.get("local_rank", v["rank"]), world_size=v["world_size"],
                   launcher=_torch_launcher_name(env), master_addr=env["MASTER_ADDR"], master_port=v["master_port"])


def _from_mpi(env: Mapping[str, str], family: str) -> DistEnv:

    rank_var, size_var, local_var = MPI_VARS[family]
    if size_var is not None:
        _missing(env, (size_var,), rank_var, f"{family}'s mpirun sets both. Start the job with mpirun/mpiexec, "
                                             f"or unset {rank_var} to run as one process.")
    v = _ints(env, {"rank": rank_var, "world_size": size_var, "local_rank": local_var, "master_port": "MASTER_PORT"})
    if "world_size" in v:
        _check_rank(v["rank"], v["world_size"], rank_var, size_var or "")
    return mpi_rendezvous(env, family, v)


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    _missing(env, SLURM_VARS, "SLURM_STEP_ID and SLURM_PROCID (an srun step)",
             "srun sets all of " + ", ".join(SLURM_VARS) + ". Start the ranks with srun inside an allocation "
             "(slurm/train.sbatch does), or unset SLURM_PROCID to run as one process.")
    v = _ints(env, {"rank": "SLURM_PROCID", "world_size": "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env
                    else "SLURM_NTASKS", "local_rank": "SLURM_LOCALID", "job_id": "SLURM_JOB_ID",
                    "master_port": "MASTER_PORT"})
    _check_rank(v["rank"], v["world_size"], "SLURM_PROCID", "SLURM_NTASKS")
    nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    port = v.get("master_port", SLURM_PORT_BASE + v["job_id"] % SLURM_PORT_SPAN)
    return DistEnv(rank=v["rank"], local_rank=v["local_rank"], world_size=v["world_size"], launcher="slurm",
                   master_addr=env.get("MASTER_ADDR", nodes[0]), master_port=port)


def _single(env: Mapping[str, str]) -> DistEnv:
    note = None
    tasks = env.get("SLURM_NTASKS", "1")
    if "SLURM_JOB_ID" in env and tasks.isdigit() and int(tasks) > 1:
        note = (f"running in the batch shell of Slurm job {env['SLURM_JOB_ID']} (SLURM_NTASKS={tasks}) without "
                f"srun: this is one process. Start one process per task with `srun python launch/train.py ...` "
                f"(slurm/train.sbatch does).")
    return DistEnv(rank=0, local_rank=0, world_size=1, launcher="none", note=note)


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's rank, local rank, world size and rendezvous, from the launcher that started it."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torch_vars(env)
    for family, (rank_var, _, _) in MPI_VARS.items():
        if rank_var in env:
            return _from_mpi(env, family)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return _from_slurm(env)
    return _single(env)


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = 600.0, quiet: bool = True) -> None:
    """Start the default process group through DeepSpeed (gloo on CPU, nccl on GPU) at the rendezvous that
    `detect_env` found; the variables are exported so DeepSpeed and torch read the same values. DeepSpeed is told
    the device (instead of guessing it, with a warning) and, when `quiet`, its start-up prints go nowhere."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    deepspeed = import_deepspeed()

    if torch.distributed.is_initialized():
        return
    if env.master_port is None:  # one process without a launcher: a one-rank group on a free local port
        env = DistEnv(0, 0, 1, env.launcher, "127.0.0.1", free_port())
    os.environ.update(env.torch_env())
    backend = "nccl" if device.type == "cuda" else "gloo"
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=timeout_s))
    if device.type != "cuda":  # every rank has mapped every rank's shared-memory buffer once all are here
        torch.distributed.barrier()
        release_shm_buffer(env.rank)


def shutdown_process_group() -> None:
    """End a run's process groups while the interpreter is still whole: collect the garbage that may still hold
    communication buffers (an engine in a reference cycle), wait for every rank, then destroy the groups.
    Left to interpreter shutdown, gloo's worker threads can abort a rank after a successful run ("terminate
    called without an active exception")."""
    if not torch.distributed.is_initialized():
        return
    import gc

    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

