"""No host synchronization inside a training step except at log steps (issue 15): the loss, the gradient
norm and the non-finite check stay on the device, and a non-finite step is skipped there (fused AdamW and
LAMB take `found_inf`); batches are prepared ahead by a background thread.

On CPU a device sync cannot be observed directly, so the test counts the calls that would be one on a GPU
(`Tensor.item`, `tolist`, `__float__`, `__int__`, `__bool__`, `numpy`) made by the training thread between
the starts of consecutive steps; the prefetch thread's host-side work is not counted.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from bigtrain.train.trainer import Trainer
from tests.conftest import tiny_config

SYNCING = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_no_host_sync_between_log_steps(run_dir, monkeypatch, optimizer):
    trainer = Trainer(tiny_config(run_dir, "causal", "train.steps=9", "log.every=3", "train.eval_every=0",
                                  "checkpoint.every=0", "train.sample_tokens=0", "log.tensorboard=false",
                                  f"optim.name={optimizer}"))
    main = threading.main_thread()
    calls: Counter[int] = Counter()  # training-thread syncing calls, by the step that was running
    step = {"now": 0}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, **kwargs):
            if threading.current_thread() is main:
                calls[step["now"]] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    micro_batches = trainer.data.micro_batches

    def start_of_step(index):
        step["now"] = index + 1  # from here until the next step starts, the calls belong to step index + 1
        return micro_batches(index)

    monkeypatch.setattr(trainer.data, "micro_batches", start_of_step)
    trainer.run()
    log_steps = {3, 6, 9}
    assert all(calls[s] == 0 for s in range(1, 10) if s not in log_steps), dict(calls)
    assert all(calls[s] > 0 for s in log_steps), dict(calls)  # the log line reads the values, once per step
    records = [r for r in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert len(records) == 3


def test_skipped_step_is_skipped_on_the_device(run_dir):
    """A NaN at step 3 (not a log step) with on_nonfinite=skip: fused AdamW's `found_inf` leaves every weight
    and moment untouched at that step, the step is reported at the next log step, and training goes on."""
    trainer = Trainer(tiny_config(run_dir, "causal", "train.steps=6", "log.every=2", "train.eval_every=0",
                                  "checkpoint.every=0", "train.sample_tokens=0", "train.on_nonfinite=skip",
                                  "log.tensorboard=false"))
    forward, seen = trainer.engine.model.forward, {"calls": 0, "before": None, "after": None}
    optimizer = trainer.engine.optimizer

    def poisoned(*args, **kwargs):
        seen["calls"] += 1
        out = forward(*args, **kwargs)
        if seen["calls"] == 3:
            seen["before"] = [p.detach().clone() for p in trainer.engine.model.parameters()]
            seen["moments"] = [optimizer.state[p]["exp_avg"].clone() for p in trainer.engine.model.parameters()]
            return out * float("nan")
        if seen["calls"] == 4:  # the start of step 4: what step 3 left
            seen["after"] = [p.detach().clone() for p in trainer.engine.model.parameters()]
            seen["moments_after"] = [optimizer.state[p]["exp_avg"].clone() for p in trainer.engine.model.parameters()]
        return out

    trainer.engine.model.forward = poisoned
    result = trainer.run()
    assert result.state.step == 6
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(seen["moments"], seen["moments_after"], strict=True))
    lines = [r for r in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert ['"skipped": true' in r for r in lines] == [False, True, False, False]  # steps 2, 3, 4, 6
