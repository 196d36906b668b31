"""Every launcher starts the same training: mpiexec (MPICH from PyPI, rendezvous through mpi4py) and accelerate,
each bitwise equal to torchrun's 2 ranks; a half-set environment fails at once naming the missing variable;
SIGUSR1 / SIGTERM stop a run after a step with a checkpoint it resumes from exactly. (Slurm and DeepSpeed's
per-node launcher with a hostfile: tests/test_slurm.py; `deepspeed --hostfile` with localhost slots=2:
tests/test_deepspeed.py::test_zero_stage_matchessingle_process.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.distributed.rendezvous import free_port
from tests.conftest import (
    REPO,
    assert_same_losses,
    launcher_args,
    read_metrics,
    require,
    require_module,
    tiny_overrides,
)
from tests.helpers.processes import signal_after_step

BIN = Path(sys.executable).parent


def run_ranks(cmd: list[str], run_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(REPO / "launch" / "train.py"), *launcher_args(run_dir)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def mpiexec() -> str:
    path = shutil.which("mpiexec", path=f"{BIN}:{os.environ.get('PATH', '')}")
    require(path is not None, "no mpiexec: `make setup` installs MPICH from PyPI (pip install mpich)")
    require_module("mpi4py", "mpi4py is the optional extra: pip install -e .[mpi]")
    return path


@pytest.mark.launches
def test_mpiexec_trains_like_torchrun(torchrun_reference, tmp_path):
    proc = run_ranks([mpiexec(), "-n", "2", sys.executable], tmp_path / "run")
    assert "launcher: mpi, rendezvous 127.0.0.1:" in proc.stdout
    assert_same_losses(torchrun_reference, tmp_path / "run")


@pytest.mark.launches
def test_accelerate_launch_trains_like_torchrun(torchrun_reference, tmp_path):
    """On a machine without GPUs accelerate starts several processes only when told --multi_gpu (with GPUs it
    picks that itself); it then runs torch's elastic launcher and exports ACCELERATE_* beside RANK & co."""
    require_module("accelerate", "accelerate is in the dev extra: pip install -e .[dev]")
    proc = run_ranks([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                      "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                      "--main_process_port", str(free_port())], tmp_path / "run")
    assert "2 rank(s) (launcher: accelerate" in proc.stdout
    assert_same_losses(torchrun_reference, tmp_path / "run")


@pytest.mark.launches
@pytest.mark.parametrize("env,missing", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}, "SLURM_NTASKS"),
])
def test_half_set_environment_fails_at_once(run_dir, env, missing):
    """Through the real command line: exit 2 before any work, one message naming the missing variable (every
    launcher's cases: tests/test_dist_env.py)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MV2_", "PMIX_"))
             and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *tiny_overrides(run_dir)],
                          capture_output=True, text=True, timeout=60, env={**clean, **env}, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert f"but not {missing}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not run_dir.exists()  # failed before any work (the time it takes: `python bench/wallclock.py`)


def test_signals_stop_after_a_step_save_and_resume_exactly(tmp_path, capsys, monkeypatch):
    """One process, through the command line in this process (signals reach the main thread): SIGUSR1 stops
    after the current step with a checkpoint and exit status 3; the same command resumes; SIGTERM stops again,
    status 143; the last run finishes. Every loss equals an uninterrupted run's."""
    from bigtrain.cli.train import run_train

    steps = 40
    extra = (f"train.steps={steps}", "checkpoint.every=1000")  # the tiny model: the signals come at a step's end
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_train(tiny_overrides(ref, "causal", *extra)) == 0
    args = tiny_overrides(run, "causal", *extra)

    signal_after_step(monkeypatch, 3, signal.SIGUSR1)
    assert run_train(args) == 3
    first = max(read_metrics(run)[0])
    signal_after_step(monkeypatch, first + 3, signal.SIGTERM)
    assert run_train(args) == 128 + signal.SIGTERM
    second = max(read_metrics(run)[0])
    assert run_train(args) == 0
    out = capsys.readouterr()
    assert f"stopped by SIGUSR1 after step {first}" in out.out and f"stopped by SIGTERM after step {second}" in \
        out.out
    assert f"(step {first})" in out.out and f"(step {second})" in out.out  # the resume lines
    assert 3 <= first < second < steps
    assert_same_losses(ref, run, steps=steps)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers removed after the run
    print(f"\nstopped after steps {first} (SIGUSR1) and {second} (SIGTERM), resumed: every loss bitwise equal")
