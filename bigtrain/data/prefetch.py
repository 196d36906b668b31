"""Batches prepared ahead of the step: a background thread collates the micro-batches of the next step (and
pins them on a GPU machine) while the current one runs; the step only copies them to the device
(asynchronously from pinned memory).

The order of batches is a pure function of the step (`GlobalBatchSampler`), and the datasets draw their
randomness from (seed, sample index), so preparing ahead changes no value.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bigtrain.models.loss import count_input_tokens, count_targets


@dataclass
class HostBatch:
    """One step's micro-batches on the host, and their (target, input) token counts."""
    step: int
    micro_batches: list[dict[str, torch.Tensor]]
    targets: int
    tokens: int


def prepare(make: Callable[[int], list[dict[str, torch.Tensor]]], step: int, pin: bool = False) -> HostBatch:
    """Step `step`'s micro-batches from `make`, pinned if asked, with their token counts."""
    batches = make(step)
    if pin:
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    return HostBatch(step, batches, sum(count_targets(b) for b in batches),
                     sum(count_input_tokens(b) for b in batches))


class BatchPrefetcher:
    """`get(step)` returns step `step`'s HostBatch, prepared by a thread that stays `depth` steps ahead."""

    def __init__(self, make: Callable[[int], list[dict[str, torch.Tensor]]], first_step: int, last_step: int,
                 pin: bool, depth: int = 2) -> None:
        self._make, self._pin = make, pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first_step, last_step), daemon=True,
                                        name="bigtrain-prefetch")
        self._thread.start()

    def _run(self, first: int, last: int) -> None:
        for step in range(first, last):
            try:
                item: HostBatch | BaseException = prepare(self._make, step, self._pin)
            except BaseException as exc:  # re-raised in the training thread, at the step that needs it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def get(self, step: int) -> HostBatch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.step != step:
            raise RuntimeError(f"prefetched the batch of step {item.step}, needed step {step}")
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
