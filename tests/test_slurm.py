"""slurm/train.sbatch and slurm/train_deepspeed.sbatch on a real one-node Slurm (tests/helpers/local_slurm.py):
2 tasks train the smoke config to the same metrics as torchrun, and a job sent SIGUSR1 checkpoints, requeues
itself, resumes and ends with every step's loss equal to the uninterrupted run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LAUNCH_STEPS, REPO, assert_same_losses, launcher_args, require
from tests.helpers.local_slurm import LocalSlurm, unavailable_reason

pytestmark = pytest.mark.launches

@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    require(not reason, f"no local Slurm: {reason} (.ci/run installs it with tests/helpers/install_slurm.sh)")
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


# How each script gets 2 CPU ranks on the local node: 2 srun tasks, or 1 task whose DeepSpeed launcher reads
# the hostfile the script builds from the node list (`localhost slots=2`).
LAYOUTS = {"train.sbatch": ["--ntasks-per-node=2"],
           "train_deepspeed.sbatch": ["--cpus-per-task=2", "--export=ALL,GPUS_PER_NODE=2"]}


def test_sbatch_trains_like_torchrun(cluster, torchrun_reference, tmp_path):
    """`sbatch slurm/train.sbatch` with 2 tasks: every rank finds itself from srun's variables, the job
    completes, and its metrics are bitwise torchrun's."""
    run_dir = tmp_path / "run"
    job = submit(cluster, "train.sbatch", run_dir, *LAYOUTS["train.sbatch"])
    end = cluster.wait(job)
    log = job_log(run_dir, job)
    assert (end.state, end.exit_code) == ("COMPLETED", "0:0"), log[-4000:]
    assert "2 rank(s) (launcher: slurm, rendezvous localhost:" in log
    assert_same_losses(torchrun_reference, run_dir)


@pytest.mark.parametrize("script", LAYOUTS)
def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, torchrun_reference, tmp_path, script):
    """`scancel --signal=USR1` mid-run: the ranks finish the step, save, exit 3; the script requeues the job;
    the requeued job resumes the same run.dir and completes, every step's loss and eval loss bitwise equal to
    torchrun's uninterrupted run. For train_deepspeed.sbatch this is also its plain test (hostfile, per-node
    DeepSpeed launcher, same metrics as torchrun)."""
    run_dir = tmp_path / "run"
    job = submit(cluster, script, run_dir, *LAYOUTS[script])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait until training is under way, then signal the ranks
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state} before training started"
        time.sleep(0.2)
    cluster.scancel("--signal=USR1", job)
    end = cluster.wait(job, timeout=300, until=("COMPLETED", "FAILED", "TIMEOUT"))  # not the requeue itself
    log = job_log(run_dir, job)
    assert (end.state, end.exit_code, end.restarts) == ("COMPLETED", "0:0", 1), log[-5000:]
    assert "received SIGUSR1" in log and "requeueing job" in log, log[-5000:]
    if script == "train_deepspeed.sbatch":
        assert "localhost slots=2" in log and "2 rank(s) (launcher: deepspeed" in log
    stopped = int(log.split("stopped by SIGUSR1 after step ")[1].split(":")[0])
    assert 1 <= stopped < LAUNCH_STEPS
    assert "resumed from" in log and f"(step {stopped})" in log
    assert_same_losses(torchrun_reference, run_dir)
    print(f"\n{script}: stopped after step {stopped} of {LAUNCH_STEPS}, requeued, resumed: every loss bitwise "
          f"equal to torchrun's")
