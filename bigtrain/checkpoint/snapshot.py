"""A rank's checkpoint in host memory: what an asynchronous save copies at the save step, so that training can
go on while a background thread writes it (`background.py`).

    HostCopies.copy(obj)       `obj` with every tensor in it replaced by a host copy. Each storage is copied whole
                               and once (the memo maps a storage to its copy), and each tensor becomes the same
                               view (offset, size, stride) of its storage's copy. torch.save writes whole storages,
                               shared ones once, keyed in the order it meets them, so the file written from the copy
                               has exactly the bytes the live objects would have given (on the CPU this is
                               `copy.deepcopy`; containers shared inside `obj` stay shared, as pickle sees them)
    HostCopies.save(path, o)   a `bigtrain.io.SaveFile` that records (path, copy of o) instead of writing: what the
                               engines' `write_native(folder, save)` and DeepSpeed's checkpoint engine call
    HostCopies.ready()         on a GPU the copies go into pinned host memory without blocking the device stream;
                               the writer waits here (one CUDA event) before its first byte; torch.save
                               records such a copy under its device's location (`saved_as_device`), so the
                               file is the one a synchronous save writes there too

Memory: one copy of every storage the rank writes (parameters, optimizer state; a layout-free piece that is a
view of a storage already copied costs nothing more). On the CPU the copies' storages go back to a `HostPool`
when the writer is done and the next save copies into them: memory already touched copies about 2.5× faster than
fresh memory, whose pages fault in one by one (0.6 against 1.6 s per GiB on the 2-core machine of the bench);
pinned memory is reused by torch's caching host allocator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain.compat.torch import forget_saved_as_device, saved_as_device


class HostPool:
    """Host storages kept from one save for the next, by size."""

    def __init__(self) -> None:
        self.free: dict[int, list[torch.UntypedStorage]] = {}

    def take(self, nbytes: int) -> torch.UntypedStorage:
        stack = self.free.get(nbytes)
        return stack.pop() if stack else torch.UntypedStorage(nbytes)

    def give(self, storages: Any) -> None:
        for storage in storages:
            self.free.setdefault(storage.nbytes(), []).append(storage)


class HostCopies:
    """Host copies of the objects one rank saves at one step, and the files they go to."""

    def __init__(self, pool: HostPool | None = None) -> None:
        self.pool = pool or HostPool()
        self.memo: dict[Any, Any] = {}  # id(object) -> its copy (copy.deepcopy's memo; storages under "torch")
        self.files: list[tuple[Path, Any, Callable[[Any, str], None] | None]] = []  # (path, copy, by_name)
        self.bytes = 0  # host bytes the copies hold
        self._event: Any = None  # CUDA: recorded after the last device-to-host copy

    def save(self, path: Path, obj: Any, by_name: Callable[[Any, str], None] | None = None) -> None:
        """Record `obj` (copied now) to be written to `path` later by `bigtrain.io.save_torch(path, copy,
        by_name)`."""
        self.files.append((Path(path), self.copy(obj), by_name))

    def copy(self, obj: Any) -> Any:
        """`obj` with every tensor copied to host memory (see the module docstring)."""
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        if isinstance(obj, torch.Tensor):
            out = self._tensor(obj)
        elif isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the type (OrderedDict) and attributes (a state_dict's _metadata)
            for k, v in obj.items():
                out[k] = self.copy(v)
        elif type(obj) is list:
            out = [self.copy(v) for v in obj]
        elif type(obj) is tuple:
            out = tuple(self.copy(v) for v in obj)
        else:
            return copy.deepcopy(obj, self.memo)  # numbers, strings, enums, torch.Size, config objects
        self.memo[key] = out
        self.memo.setdefault(id(self.memo), []).append(obj)  # keep `obj` alive: its id must not be reused
        return out

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            storage = t.untyped_storage()
            copies = self.memo.setdefault("torch", {})  # where Tensor.__deepcopy__ finds a storage's copy
            if storage._cdata not in copies:
                copies[storage._cdata] = self.pool.take(storage.nbytes()).copy_(storage)
                self.bytes += storage.nbytes()
            if t.grad_fn is None:
                return copy.deepcopy(t, self.memo)
            # A view that autograd tracks (DeepSpeed's fp32 partitions): the same view of a copied storage,
            # marked as requiring grad as pickle records it. The detached view is kept alive: the memo holds its id.
            view = t.detach()
            self.memo.setdefault(id(self.memo), []).append(view)
            return copy.deepcopy(view, self.memo).requires_grad_(t.requires_grad)
        storage = t.untyped_storage()
        pinned = self.memo.setdefault("pinned", {})
        host = pinned.get(storage._cdata)
        if host is None:  # the whole storage once, into pinned memory, without waiting for the device
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=True).untyped_storage()
            host.copy_(storage, non_blocking=True)
            pinned[storage._cdata] = host
            saved_as_device(host, storage)  # the file records the device, as a synchronous save's does
            self.bytes += storage.nbytes()
            self._event = torch.cuda.Event()
            self._event.record()
        out = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, nn.Parameter):
            return nn.Parameter(out, requires_grad=t.requires_grad)
        return out.requires_grad_(t.requires_grad) if t.is_floating_point() and t.requires_grad else out

    def release(self) -> None:
        """Drop the copies (the writer is done with them); host storages go back to the pool."""
        forget_saved_as_device(self.memo.get("pinned", {}).values())
        self.pool.give(self.memo.get("torch", {}).values())
        self.memo.clear()
        self.files.clear()

    def ready(self) -> None:
        """Wait until every device-to-host copy has landed (nothing to wait for on the CPU)."""
        if self._event is not None:
            self._event.synchronize()
