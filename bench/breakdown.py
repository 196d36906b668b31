"""Where bigtrain's loop spends its time outside the model's arithmetic: wall time of the loop's parts, measured by
wrapping them for one extra (untimed) run of step_overhead.py --breakdown.

The parts are named by where they live; one that a later version of the loop no longer has is left out (the
table says which were found). Times are wall clock on the training thread; a part nested in another is counted
in both (the engine step holds the per-layer gradient norms).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections import Counter
from collections.abc import Iterator

# (module, class or None for a module function, attribute, label)
PARTS = [
    ("bigtrain.train.trainer", "Trainer", "micro_batches", "batches (sampler, collate, to device)"),
    ("bigtrain.data.prefetch", "BatchPrefetcher", "get", "  of it: waiting for the prefetch thread"),
    ("bigtrain.train.trainer", "Trainer", "_settle", "reading the step's values (log steps)"),
    ("bigtrain.train.metrics", "MetricsLog", "write", "metrics.jsonl + TensorBoard scalars"),
    ("bigtrain.train.metrics", "MetricsLog", "scalars", "TensorBoard per-layer gradient norms"),
    ("bigtrain.train.metrics", "Progress", "update", "console line (log steps)"),
    ("bigtrain.train.metrics", "Progress", "advance", "progress bar"),
    ("bigtrain.train.watchdog", "Watchdog", "beat", "watchdog heartbeats"),
    ("bigtrain.train.preemption", "StopRequest", "agreed", "stop-signal check"),
    ("bigtrain.engine.step", None, "per_layer_grad_norms", "per-layer gradient norms (inside the step)"),
]


class PartTimes:
    """Seconds and calls by part label; `found`: the parts this version of the loop has."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self.calls: Counter = Counter()
        self.found: list[str] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


@contextlib.contextmanager
def timed_parts() -> Iterator[PartTimes]:
    """Wrap every part of PARTS that exists while the block runs."""
    times = PartTimes()
    undo = []
    for module_name, class_name, attr, label in PARTS:
        owner = importlib.import_module(module_name)
        owner = getattr(owner, class_name, None) if class_name else owner
        original = getattr(owner, attr, None) if owner is not None else None
        if original is None:
            continue

        def wrapper(*args, __f=original, __label=label, **kwargs):
            start = time.perf_counter()
            try:
                return __f(*args, **kwargs)
            finally:
                times.seconds[__label] += time.perf_counter() - start
                times.calls[__label] += 1

        setattr(owner, attr, wrapper)
        undo.append((owner, attr, original))
        times.found.append(label)
    try:
        yield times
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)
