"""What an experiment tracker answers, and how a metrics.jsonl line becomes its scalars.

A record is one metrics.jsonl line (`{"step": s, "loss": ..., "eval_sources": {"web": {"eval_loss": ...}}}`); its
scalars are the numbers in it, nested keys joined by "/" (`eval_sources/web/eval_loss`), booleans as 0 or 1,
`step` left out (it is the x axis) and null or non-finite values left out (metrics.jsonl writes them as null).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """One place a run is recorded (rank 0 only: other ranks hold a `NoTracker`)."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The effective config of this start (a nested dict, as config.yaml)."""

    def log_record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line (training, evaluation, ...), at its `step`."""

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """An RGB picture [height, width, 3] uint8 (the attention maps of an evaluation)."""

    def log_checkpoint(self, path: Path, step: int) -> None:
        """The last checkpoint of the run (end of training, early stop, stop signal)."""

    def close(self, finished: bool) -> None:
        """End this start: `finished` when the loop ended without an exception."""


class NoTracker:
    """Records nothing: no tracker configured, or a rank other than 0."""

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_record(self, record: dict[str, Any]) -> None:
        pass

    def log_image(self, tag: str, image: Any, step: int) -> None:
        pass

    def log_checkpoint(self, path: Path, step: int) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass


class Trackers:
    """Several trackers answering as one (MLflow and W&B together), in the order given. A tracker that fails while
    the run trains (a server gone, a full disk) is reported once on stderr and left out from then on: the run goes
    on, and metrics.jsonl keeps every line."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = list(trackers)

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as exc:  # a tracker must not end a training run
                self.trackers.remove(tracker)
                print(f"bigtrain: warning: {type(tracker).__name__}.{call} failed ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:300]}); it records nothing more in this run (metrics.jsonl "
                      f"keeps every line)", file=sys.stderr, flush=True)

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("log_config", config)

    def log_record(self, record: dict[str, Any]) -> None:
        self._each("log_record", record)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self._each("log_image", tag, image, step)

    def log_checkpoint(self, path: Path, step: int) -> None:
        self._each("log_checkpoint", path, step)

    def close(self, finished: bool) -> None:
        self._each("close", finished)


def record_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The scalars of a metrics.jsonl line, by key (see the module docstring)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if not prefix and key == "step":
            continue
        if isinstance(value, dict):
            out.update(record_scalars(value, f"{name}/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"model": {"d_model": 32}}` -> `{"model.d_model": "32"}` (parameters as trackers show them; a list, such
    as data.sources, as its repr)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = "null" if value is None else str(value)
    return out
