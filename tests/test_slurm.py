"""slurm/train.sbatch and slurm/train_deepspeed.sbatch on a real one-node Slurm (tests/helpers/local_slurm.py):
2 tasks train the smoke config to the same metrics as torchrun, and a job sent SIGUSR1 checkpoints, requeues
itself, resumes and ends with every step's loss equal to the uninterrupted run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LAUNCH_STEPS, REPO, assert_same_losses, launcher_args
from tests.helpers.local_slurm import LocalSlurm, unavailable_reason

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    cluster = LocalSlurm.start()
    yield cluster
    cluster.stop()


def submit(cluster: LocalSlurm, script: str, run_dir: Path, *sbatch_args: str) -> str:
    """sbatch the shipped script with 2 CPU tasks on the local node (no GPUs), its log in run_dir's parent."""
    env = {"BIGTRAIN_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    return cluster.sbatch(["--gpus-per-node=0", "--cpus-per-task=1", *sbatch_args,
                           f"--output={run_dir.parent}/slurm-%j.out", str(REPO / "slurm" / script),
                           *launcher_args(run_dir)[1:]], env=env, cwd=REPO)


def job_log(run_dir: Path, job: str) -> str:
    return (run_dir.parent / f"slurm-{job}.out").read_text()


@pytest.mark.parametrize("script,layout", [("train.sbatch", ["--ntasks-per-node=2"]),
                                           ("train_deepspeed.sbatch", ["--cpus-per-task=2"])])
def test_sbatch_trains_like_torchrun(cluster, torchrun_reference, tmp_path, script, layout):
    """2 ranks through srun (one task each), or through DeepSpeed's launcher with the hostfile the script builds
    from the node list (`localhost slots=2`): the same metrics, bitwise, as torchrun's 2 ranks."""
    run_dir = tmp_path / "run"
    extra = ["--export=ALL,GPUS_PER_NODE=2"] if script == "train_deepspeed.sbatch" else []
    job = submit(cluster, script, run_dir, *layout, *extra)
    end = cluster.wait(job)
    log = job_log(run_dir, job)
    assert (end.state, end.exit_code) == ("COMPLETED", "0:0"), log[-4000:]
    assert "launcher: slurm" in log if script == "train.sbatch" else "launcher: deepspeed" in log
    if script == "train_deepspeed.sbatch":
        assert "localhost slots=2" in log
    assert_same_losses(torchrun_reference, run_dir)


def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, torchrun_reference, tmp_path):
    """`scancel --signal=USR1` mid-run: the ranks finish the step, save, exit 3; the script requeues the job;
    the requeued job resumes the same run.dir and every step's loss equals the uninterrupted run's."""
    run_dir = tmp_path / "run"
    job = submit(cluster, "train.sbatch", run_dir, "--ntasks-per-node=2")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait until training is under way, then signal the ranks
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert cluster.job(job).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), job_log(run_dir, job)[-3000:]
        time.sleep(0.2)
    cluster.scancel("--signal=USR1", job)
    end = cluster.wait(job, timeout=300, until=("COMPLETED", "FAILED", "TIMEOUT"))  # not the requeue itself
    log = job_log(run_dir, job)
    assert (end.state, end.exit_code, end.restarts) == ("COMPLETED", "0:0", 1), log[-5000:]
    assert "received SIGUSR1" in log and "requeueing job" in log, log[-5000:]
    stopped = int(log.split("stopped by SIGUSR1 after step ")[1].split(":")[0])
    assert 1 <= stopped < LAUNCH_STEPS
    assert "resumed from" in log and f"(step {stopped})" in log
    assert_same_losses(torchrun_reference, run_dir)
    print(f"\nstopped after step {stopped} of {LAUNCH_STEPS}, requeued, resumed: every loss bitwise equal")
