"""One run per run.dir, unusable run.dirs, sizes that cannot fit, signals and streams, and every command's
failures as one paragraph (issue: trust). Single process: through the real command line where it matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bigtrain.cli.train import run_train
from bigtrain.errors import ConfigError, RunDirError
from bigtrain.train.run_dir import RunLock
from bigtrain.train.trainer import Trainer, train
from tests.conftest import REPO, read_metrics, run_cli, run_launcher, tiny_config, tiny_overrides
from tests.helpers.processes import signal_after_step


def _one_paragraph(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain:")]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr[-3000:]
    return lines[0]


# --- one run per run.dir -----------------------------------------------------------------------------------
@pytest.mark.launches
def test_second_run_on_a_live_run_dir_is_refused_naming_the_holder(run_dir):
    """A live run holds run.dir: a second one (another process) stops at once, naming host, pid and command, and
    leaves the first run's files alone."""
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.');\n"
        "from pathlib import Path\n"
        "from bigtrain.train.run_dir import RunLock\n"
        f"RunLock(Path({str(run_dir)!r})).acquire(); print('held', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_launcher(tiny_overrides(run_dir, "causal", "train.steps=2"))
        line = _one_paragraph(proc)
        assert f"is in use by another run (host {os.uname().nodename}, pid {holder.pid}" in line
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_run_is_taken_over_with_a_note(run_dir, capsys):
    """A run killed with SIGKILL leaves its record in run.dir/.lock but not the lock itself: the next run takes
    it over, says so, and resumes."""
    run_dir.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; sys.path.insert(0, '.');\n"
        "from pathlib import Path\n"
        "from bigtrain.train.run_dir import RunLock\n"
        f"RunLock(Path({str(run_dir)!r})).acquire(); os.kill(os.getpid(), signal.SIGKILL)")], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / ".lock").read_text())["pid"] > 0
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    assert "note: took over the lock of" in capsys.readouterr().out
    assert (run_dir / ".lock").read_text() == ""  # a clean end leaves nothing to take over
    RunLock(run_dir).acquire().release()  # and the lock is free


# --- run.dir that cannot be used ------------------------------------------------------------------------------
@pytest.mark.launches
@pytest.mark.parametrize("problem", ["too-long", "a-file", "below-a-file"])
def test_unusable_run_dir_is_one_paragraph(tmp_path, problem):
    """A run.dir too long for the file system, one that is a file, one that cannot be created (below a file):
    one paragraph naming run.dir, exit 2. (As root, permission bits do not stop writes; the last case is the
    unwritable run.dir a root CI can show.)"""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run_dir, expected = {
        "too-long": (tmp_path / ("x" * 300), "is too long for the file system"),
        "a-file": (blocker, "is a file, not a directory"),
        "below-a-file": (blocker / "run", "cannot be written: a part of the path is a file"),
    }[problem]
    line = _one_paragraph(run_launcher(tiny_overrides(run_dir, "causal", "train.steps=2")))
    assert expected in line and "run.dir" in line


# --- sizes that cannot fit: refused before any allocation ---------------------------------------------------------
@pytest.mark.launches
@pytest.mark.parametrize("size", ["model.d_model=1000000000", "model.max_seq_len=1000000000",
                                  "model.vocab_size=1000000000"])
def test_sizes_that_cannot_fit_are_refused_before_allocating(run_dir, size):
    extra = ["model.positions=rotary"] if "max_seq_len" in size else []
    if "d_model" in size:
        extra = ["model.n_heads=8"]
    start = time.monotonic()
    line = _one_paragraph(run_launcher(tiny_overrides(run_dir, "causal", size, *extra)))
    assert "The model does not fit: each rank needs at least" in line and "GiB are free on cpu" in line
    print(f"\nrefused in {time.monotonic() - start:.1f} s: {line[:160]}")


# --- signals and streams ------------------------------------------------------------------------------------------
LONG = ("train.steps=40", "checkpoint.every=1000")  # the tiny model: the signals come at a step's end


def test_ctrl_c_saves_at_the_end_of_the_step_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_train(tiny_overrides(ref, "causal", *LONG)) == 0
    signal_after_step(monkeypatch, 3, signal.SIGINT)
    assert run_train(tiny_overrides(run, "causal", *LONG)) == 130
    out = capsys.readouterr()
    assert "received SIGINT: stopping after the current step and saving a checkpoint; press Ctrl-C again" in out.err
    stopped = max(read_metrics(run)[0])
    assert f"stopped by SIGINT after step {stopped}" in out.out
    assert run_train(tiny_overrides(run, "causal", *LONG)) == 0
    assert {s: r["loss"] for s, r in read_metrics(run)[0].items()} == \
        {s: r["loss"] for s, r in read_metrics(ref)[0].items()}


def test_second_ctrl_c_aborts_saying_nothing_new_was_saved(tmp_path, capsys, monkeypatch):
    """Two Ctrl-C at the end of step 3, one after the other: the first asks for a stop and a save after the step,
    the second lands before that save."""
    run = tmp_path / "run"
    signal_after_step(monkeypatch, 3, signal.SIGINT, times=2)
    assert run_train(tiny_overrides(run, "causal", *LONG)) == 130
    err = capsys.readouterr().err
    assert "aborted by a second Ctrl-C: nothing new was saved. No checkpoint of this run exists yet" in err
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step_*"))


@pytest.mark.launches
def test_closed_stdout_does_not_stop_training(tmp_path):
    """`launch/train.py … | head -n 2`: the console goes away after two lines; training goes on to the end
    (metrics.jsonl complete, final checkpoint written) and exits 0."""
    run_dir = tmp_path / "run"
    args = " ".join(tiny_overrides(run_dir, "causal", "train.steps=12", "log.every=1"))
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} launch/train.py {args} | head -n 2"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 2
    assert sorted(read_metrics(run_dir)[0]) == list(range(1, 13))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"


# --- the other commands, and small things that used to crash -------------------------------------------------------
def test_empty_sample_prompt_samples_from_a_document_start(run_dir, capsys):
    train(tiny_config(run_dir, "causal", "train.steps=2", "train.sample_tokens=8", "train.sample_prompt="))
    assert "--- sample (8 tokens after '') ---" in capsys.readouterr().out


def test_evaluate_and_consolidate_fail_in_one_paragraph(run_dir):
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    consolidate = run_cli("consolidate", str(run_dir))
    assert consolidate.returncode == 0, consolidate.stderr
    weights = run_dir / "consolidated" / "step_00000002"
    line = _one_paragraph(run_cli("evaluate", str(weights), "model.d_model=64"))
    assert "does not fit this model" in line and "size mismatch" in line
    debug = run_cli("evaluate", str(weights), "model.d_model=64", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert "holds no checkpoint" in _one_paragraph(run_cli("consolidate", str(run_dir / "nope")))


@pytest.mark.launches
def test_an_unexpected_error_is_one_paragraph_and_the_traceback_needs_debug(tmp_path):
    script = REPO / "tests" / "helpers" / "failing_rank.py"
    env = {**os.environ, "BIGTRAIN_TEST_FAIL_RANK": "0"}
    args = tiny_overrides(tmp_path / "run", "causal", "train.steps=4")
    plain = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert "RuntimeError: injected failure (rerun with --debug for the traceback)" in \
        _one_paragraph(plain, status=1)
    debug = subprocess.run([sys.executable, str(script), *args, "--debug"], capture_output=True, text=True,
                           env=env, cwd=REPO)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_trainer_api_refuses_unfit_sizes_too(run_dir):
    with pytest.raises(ConfigError, match="does not fit"):
        Trainer(tiny_config(run_dir, "causal", "model.vocab_size=1000000000"))
    with pytest.raises(RunDirError, match="is a file"):
        (run_dir.parent / "f").write_text("")
        Trainer(tiny_config(run_dir.parent / "f", "causal"))


@pytest.mark.launches
def test_disk_full_while_saving_is_one_paragraph_and_keeps_the_previous_checkpoint(run_dir):
    """Writes past a limit fail (RLIMIT_FSIZE, like a full disk: torch says "unexpected pos"): the save of step 4
    stops in one paragraph naming the file and the space; step 2 stays intact and `latest`; no .tmp is left."""
    assert run_launcher(tiny_overrides(run_dir, "causal", "train.steps=2")).returncode == 0
    limited = ("import resource, sys; sys.path.insert(0, '.');\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))\n"
               "from bigtrain.cli.train import run_train\n"
               "sys.exit(run_train(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", limited, *tiny_overrides(run_dir, "causal", "train.steps=4")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    line = _one_paragraph(proc)
    assert "Could not write the checkpoint file" in line and "step_00000004.tmp" in line and "MiB are free" in line
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002"]
    assert run_launcher(tiny_overrides(run_dir, "causal", "train.steps=4")).returncode == 0  # room again: resumes
