"""Process helpers of the tests: a signal sent at a known point of an in-process run; waiting on processes that
are not this one's children is the CLI's own `wait_for_exit`."""

from __future__ import annotations

import os
from typing import Any

import pytest

from bigtrain.cli.lifetime import wait_for_exit  # noqa: F401  (the tests wait on ranks as the CLI does)


def signal_after_step(monkeypatch: pytest.MonkeyPatch, step: int, signum: int, times: int = 1) -> None:
    """For a run in this process: send `signum` to this process `times` times in a row as soon as metrics.jsonl has
    the line of training step `step` (or a later one), from the training thread right after it writes that line.
    The signal lands at a known point of the run (the end of that step, before the next begins) instead of
    whenever a watcher thread polling the file gets to it; each Python handler has run before the next signal."""
    from bigtrain.train.metrics import MetricsLog

    write, sent = MetricsLog.write, []

    def write_then_signal(self: MetricsLog, record: dict[str, Any]) -> None:
        write(self, record)
        if not sent and "loss" in record and record["step"] >= step:
            sent.append(record["step"])
            for _ in range(times):
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
