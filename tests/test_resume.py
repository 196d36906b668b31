"""Exact resume after SIGKILL, and checkpoints that survive a crash in the middle of a save."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.integrity import read_latest
from bigtrain.errors import CheckpointError
from bigtrain.io import load_torch
from bigtrain.train.trainer import Trainer, train
from tests.conftest import REPO, run_launcher, tiny_config, tiny_overrides

INJECT = REPO / "tests" / "helpers" / "inject.py"

RESUME_EXTRA = ("model.d_model=64", "data.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=8",
                "model.dropout=0.1", "checkpoint.every=5", "train.eval_every=10")


def _losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.launches
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """20 straight steps == the same command SIGKILLed after step 12 (checkpoint every 5) and started again.

    The kill comes from inside, in the middle of step 13's forward pass (tests/helpers/inject.py), so it lands at
    the same point every time instead of racing the run. fp32 on CPU with one thread: every `loss` line is bitwise
    equal (dropout on, so the RNG state is restored too), and eval lines as well.
    """
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = run_launcher(tiny_overrides(straight_dir, "causal", *RESUME_EXTRA))
    assert straight.returncode == 0, straight.stderr

    killed = run_launcher(tiny_overrides(killed_dir, "causal", *RESUME_EXTRA), script=INJECT,
                          env={"BIGTRAIN_TEST_KILL_STEP": "13"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    seen = max(_losses(killed_dir))
    assert seen == 12, f"killed at the wrong step (step {seen} was the last one logged)"
    assert (killed_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"

    resumed = run_launcher(tiny_overrides(killed_dir, "causal", *RESUME_EXTRA))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "(step 10)" in resumed.stdout

    a, b = _losses(straight_dir), _losses(killed_dir)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert a == b  # bitwise: floats parsed from identical JSON text
    evals = [(straight_dir / "metrics.jsonl"), (killed_dir / "metrics.jsonl")]
    ev = [[json.loads(x) for x in p.read_text().splitlines() if "eval_loss" in x] for p in evals]
    assert [(r["step"], r["eval_loss"]) for r in ev[0]] == [(r["step"], r["eval_loss"]) for r in ev[1]]


@pytest.mark.parametrize("crash_at", ["part", "rename", "pointer"])
def test_crash_during_checkpoint_write_keeps_previous(run_dir, monkeypatch, crash_at):
    trainer = Trainer(tiny_config(run_dir, "causal", "train.steps=2"))
    trainer.run()  # final checkpoint at step 2
    ckpt_dir = run_dir / "checkpoints"
    good = read_latest(ckpt_dir)[0]
    weights = load_torch(good / "model.pt")

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash

    if crash_at == "part":  # killed while writing the optimizer file
        real_save, calls = torch.save, {"n": 0}

        def partial_save(obj, f):
            calls["n"] += 1
            if calls["n"] == 2:
                f.write(b"torn")
                raise Crash
            real_save(obj, f)

        monkeypatch.setattr(ckpt.torch, "save", partial_save)
    elif crash_at == "rename":  # all files written, killed before the directory became visible
        monkeypatch.setattr(ckpt.os, "rename", crash)
    else:  # directory complete, killed before the pointer moved
        monkeypatch.setattr(ckpt.os, "replace", crash)

    trainer.state.step = 3
    with pytest.raises(Crash):
        trainer.save()
    monkeypatch.undo()

    assert read_latest(ckpt_dir)[0] == good
    for name, tensor in load_torch(good / "model.pt").items():
        assert torch.equal(tensor, weights[name])
    resumed = Trainer(tiny_config(run_dir, "causal", "train.steps=4"))
    assert resumed.state.step == 2
    resumed.run()
    assert not list(ckpt_dir.glob("*.tmp")), "stale temporary checkpoint left behind"


def test_keep_prunes_old_checkpoints(run_dir):
    train(tiny_config(run_dir, "causal", "train.steps=8", "checkpoint.every=2", "checkpoint.keep=2"))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000008"]


def test_resume_refuses_a_different_model(run_dir):
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    with pytest.raises(CheckpointError, match=r"model.d_model: 32 -> 64.*new run.dir"):
        Trainer(tiny_config(run_dir, "causal", "train.steps=4", "model.d_model=64"))


def test_corrupt_checkpoint_is_a_clear_error(run_dir):
    """The only checkpoint damaged: a clear error naming the file; the checkpoint is moved aside, not deleted."""
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    (read_latest(run_dir / "checkpoints")[0] / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"No intact checkpoint .*step_00000002 \(model.pt has 7 bytes"):
        Trainer(tiny_config(run_dir, "causal", "train.steps=4"))
    assert (run_dir / "checkpoints" / "step_00000002.damaged" / "model.pt").read_bytes() == b"garbage"
