"""Measure the activation memory autograd keeps for backward: the bytes of the distinct storages saved by
the graph that are alive, now and at their peak (`torch.autograd.graph.saved_tensors_hooks`).

A saved tensor is wrapped in a small holder; when autograd frees the graph node that saved it (after its
backward, or when the graph is dropped) the holder dies and its storage stops counting once no other live
holder shares it. Parameters and registered buffers are not activations and are never counted (ZeRO-3's
gathered parameters are still `nn.Parameter` objects). Under a pipeline schedule the peak covers every
micro-batch in flight.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedActivationMeter:
    """Within `measuring()`, counts the bytes of distinct storages autograd saves that are still alive: `current`
    now, `peak` its largest value; `module`'s parameters and buffers are excluded."""

    def __init__(self, module: nn.Module) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]
                         if t.device.type != "meta" and t.numel()}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, live holders]
        self.current = self.peak = 0

    def _pack(self, t: torch.Tensor) -> object:
        if isinstance(t, nn.Parameter) or t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return t
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    @staticmethod
    def _unpack(saved: object) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    @contextmanager
    def measuring(self) -> Iterator[SavedActivationMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self
