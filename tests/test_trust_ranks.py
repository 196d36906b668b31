"""Failures of one rank in a multi-rank job (tests/helpers/inject.py injects them): a non-finite loss is decided
the same on every rank and either stops the run naming the step and rank or skips the update leaving weights
and optimizer state untouched; a hang ends in stack dumps and a non-zero exit; ranks whose launcher died stop;
SIGKILL of a rank while DeepSpeed saves, or inside a pipeline step, loses nothing a resume cannot redo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bigtrain.compat.deepspeed import safe_checkpoint_loading
from bigtrain.distributed.rendezvous import free_port
from tests.conftest import DP_LAYOUT, REPO, launch_ok, launch_ranks, read_metrics, tiny_overrides
from tests.helpers.processes import wait_for_exit

pytestmark = pytest.mark.launches

INJECT = REPO / "tests" / "helpers" / "inject.py"


def _run(run_dir: Path, *extra: str, n: int = 2, env: dict[str, str] | None = None, timeout: float = 300):
    return launch_ranks(n, tiny_overrides(run_dir, "causal", *DP_LAYOUT, *extra), script=INJECT, env=env,
                        timeout=timeout)


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a (nested) checkpoint object, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model and optimizer tensors of a DeepSpeed checkpoint (trainer files, with RNG state, left out)."""
    state = {}
    with safe_checkpoint_loading():
        for path in sorted(checkpoint.glob("*states.pt")):
            state.update({f"{path.name}{k}": v for k, v in _tensors(torch.load(path, weights_only=True)).items()})
    return state


# --- non-finite steps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [("parallel.zero_stage=1",), ("parallel.pipeline=2", "parallel.zero_stage=0")],
                         ids=["zero1", "pipeline"])
def test_nonfinite_stop_names_step_and_rank(tmp_path, layout):
    proc = _run(tmp_path / "run", *layout, "train.steps=6", env={"BIGTRAIN_TEST_RANK": "1",
                                                                  "BIGTRAIN_TEST_NAN_STEPS": "3"})
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "Non-finite loss or gradient at step 3" in err and "first seen on rank 1" in err, err[-3000:]
    lines = read_metrics(tmp_path / "run")[0]
    assert max(lines) == 3  # the step that stopped it has its line (no update applied), nothing past it
    assert lines[3]["loss"] is None and lines[3]["skipped"] is True and lines[3]["tokens_per_s"] is None


@pytest.mark.parametrize("layout", [("parallel.zero_stage=1",), ("parallel.zero_stage=0",),
                                    ("parallel.pipeline=2", "parallel.zero_stage=0")],
                         ids=["zero1", "zero0", "pipeline"])
def test_nonfinite_skip_leaves_weights_and_optimizer_untouched(tmp_path, layout):
    """NaN on rank 1 in step 3 with on_nonfinite=skip: every rank skips the update; the checkpoints of steps 2
    and 3 hold bitwise the same model and optimizer tensors; step 3 is in metrics.jsonl as skipped; training goes
    on and ends."""
    run_dir = tmp_path / "run"
    proc = _run(run_dir, *layout, "train.steps=5", "train.on_nonfinite=skip", "checkpoint.every=1",
                "checkpoint.keep=10", "log.every=2", env={"BIGTRAIN_TEST_RANK": "1", "BIGTRAIN_TEST_NAN_STEPS": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update skipped, weights and optimizer state unchanged (1 in a row)" in proc.stdout
    lines = read_metrics(run_dir)[0]
    assert lines[3]["skipped"] is True and lines[4]["skipped"] is False  # the skipped step is logged off-cycle
    before, after, later = (_state(run_dir / "checkpoints" / f"step_0000000{s}") for s in (2, 3, 4))
    assert sorted(before) == sorted(after) and before
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert not all(torch.equal(v, later[k]) for k, v in after.items())  # step 4 did update


def test_skipping_gives_up_after_max_skipped_steps(tmp_path):
    proc = _run(tmp_path / "run", "parallel.zero_stage=1", "train.steps=8", "train.on_nonfinite=skip",
                "train.max_skipped_steps=3", env={"BIGTRAIN_TEST_RANK": "0", "BIGTRAIN_TEST_NAN_STEPS": "2,3,4,5"})
    assert proc.returncode != 0
    assert "3 steps in a row were non-finite and skipped (steps 2-4; train.max_skipped_steps=3)" in proc.stderr


# --- hangs and orphans ---------------------------------------------------------------------------------------
def test_a_hung_rank_ends_the_job_with_stack_dumps(tmp_path):
    """Rank 1 sleeps inside step 3: within train.hang_timeout both ranks write their stacks to run.dir and exit
    non-zero (status 4, which the Slurm scripts requeue); rank 1's stack shows where it hangs."""
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = _run(run_dir, "parallel.zero_stage=1", "train.steps=6", "train.hang_timeout=6",
                env={"BIGTRAIN_TEST_RANK": "1", "BIGTRAIN_TEST_SLEEP_STEP": "3"}, timeout=240)
    assert proc.returncode != 0
    assert "no progress for" in proc.stderr and "train.hang_timeout=6" in proc.stderr, proc.stderr[-3000:]
    dump = (run_dir / "hang-rank1.txt").read_text()
    assert "during step 3" in dump and "in micro_batches" in dump, dump
    assert (run_dir / "hang-rank0.txt").exists()
    print(f"\nhung job ended after {time.monotonic() - start:.0f} s (hang_timeout 6 s)")


def test_ranks_stop_when_their_launcher_dies(tmp_path):
    """SIGKILL of torchrun mid-run: its ranks notice the new parent and exit within seconds instead of training
    on as orphans."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "launch" / "train.py"),
           *tiny_overrides(run_dir, "causal", *DP_LAYOUT, "parallel.zero_stage=1", "train.steps=100000",
                           "model.d_model=128", "model.d_ff=512")]
    launcher = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                            text=True).stdout.split()]
    assert len(ranks) == 2, ranks
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    killed_at = time.monotonic()
    alive = wait_for_exit(ranks, timeout=60)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "ranks trained on after their launcher died"
    print(f"\norphaned ranks exited {time.monotonic() - killed_at:.1f} s after their launcher was killed")


# --- SIGKILL of one rank, then the same command ----------------------------------------------------------------
@pytest.mark.parametrize("kill,layout,resume", [
    ({"BIGTRAIN_TEST_KILL_SAVE": "4"}, ("parallel.zero_stage=2",), 2),
    ({"BIGTRAIN_TEST_KILL_STEP": "5"}, ("parallel.pipeline=2", "parallel.zero_stage=1"), 4),
], ids=["deepspeed-save", "pipeline-step"])
def test_sigkill_of_a_rank_then_resume_equals_the_straight_run(tmp_path, kill, layout, resume):
    """Rank 1 SIGKILLs itself while the ZeRO-2 checkpoint of step 4 is being written (its DeepSpeed files are
    on disk, the checkpoint is not complete), or inside step 5 of a pipeline run (the last stage, mid forward):
    the job dies; the same command resumes from the last complete checkpoint and every loss equals the
    uninterrupted run's."""
    extra = (*layout, "train.steps=8", "checkpoint.every=2")
    straight = tmp_path / "straight"
    launch_ok(2, tiny_overrides(straight, "causal", *DP_LAYOUT, *extra))
    run_dir = tmp_path / "run"
    proc = _run(run_dir, *extra, env={"BIGTRAIN_TEST_RANK": "1", **kill})
    assert proc.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{resume:08d}"
    out = launch_ok(2, tiny_overrides(run_dir, "causal", *DP_LAYOUT, *extra))
    assert "resumed from" in out and f"(step {resume})" in out
    a, b = read_metrics(straight)[0], read_metrics(run_dir)[0]
    assert sorted(b) == list(range(1, 9))
    assert {s: r["loss"] for s, r in a.items()} == {s: r["loss"] for s, r in b.items()}
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
