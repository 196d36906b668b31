"""torch APIs that differ between the releases bigtrain supports (pyproject.toml declares the floor, torch 2.4; the
code paths for older releases were run on 2.4.1 and 2.5.1: docs/deepspeed.md, "Versions").

    all_gather_into       torch.distributed.all_gather_single (new name) / all_gather_into_tensor (before)
    reduce_scatter_into   reduce_scatter_single / reduce_scatter_tensor, or all-reduce + own chunk where the
                          backend has no reduce-scatter (gloo before the new names)
    sdpa                  scaled_dot_product_attention with grouped-query heads: enable_gqa where it exists
                          (torch >= 2.5), else key/value heads repeated to the query heads
    weights_only_loading  every torch.load inside the block unpickles tensors and plain containers only, also
                          where a library (DeepSpeed) passes weights_only=False: TORCH_FORCE_WEIGHTS_ONLY_LOAD;
                          a failed load names its file (`bigtrain.io.LOADED_FILE` on the exception)
    saved_as_device       torch.save records a host copy of a device storage under the device's location (a
                          storage tagger of torch.serialization.register_package), so the file is the one the
                          device storage gives (asynchronous checkpoints write from pinned host copies)
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from bigtrain.io import LOADED_FILE

_DEVICE_OF_HOST_COPY: dict[int, str] = {}  # data_ptr of a host copy -> the location of the storage it copies
_TAGGER_PRIORITY = -41  # before torch's own taggers (cpu is 10); priorities must differ (the registry is sorted)


def _tag_host_copy(storage) -> str | None:
    if storage.device.type != "cpu" or not _DEVICE_OF_HOST_COPY:
        return None
    return _DEVICE_OF_HOST_COPY.get(storage.data_ptr())


def _restore_nothing(storage, location: str):
    return None  # loading is torch's own business (map_location or the location's deserializer)


def saved_as_device(host: torch.UntypedStorage, device_storage: torch.UntypedStorage) -> None:
    """From now until `forget_saved_as_device`, torch.save records `host` (a host copy of `device_storage`)
    under `device_storage`'s location ("cuda:0"), as if it were saving the device storage itself."""
    from torch import serialization

    if not any(entry[1] is _tag_host_copy for entry in serialization._package_registry):
        serialization.register_package(_TAGGER_PRIORITY, _tag_host_copy, _restore_nothing)
    _DEVICE_OF_HOST_COPY[host.data_ptr()] = serialization.location_tag(device_storage)


def forget_saved_as_device(hosts: Iterable[torch.UntypedStorage]) -> None:
    for host in hosts:
        _DEVICE_OF_HOST_COPY.pop(host.data_ptr(), None)


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """output = the ranks' `tensor`s concatenated along dimension 0 (output has world × its rows)."""
    import torch.distributed as dist  # here, not at the top: the model files import `sdpa` from this module

    gather = getattr(dist, "all_gather_single", None)
    if gather is not None:
        gather(output, tensor, group=group)
    else:
        dist.all_gather_into_tensor(output, tensor, group=group)


def reduce_scatter_into(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """output = this rank's chunk (along dimension 0) of the sum over ranks of `tensor`."""
    import torch.distributed as dist

    scatter = getattr(dist, "reduce_scatter_single", None)
    if scatter is not None:
        scatter(output, tensor, group=group)
    elif dist.get_backend(group) == "gloo":
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        output.copy_(total.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)])
    else:
        dist.reduce_scatter_tensor(output, tensor, group=group)


def _sdpa_has_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a Python signature: ask by calling
        q = torch.zeros(1, 2, 1, 2)
        try:
            F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


SDPA_HAS_GQA = _sdpa_has_gqa()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float,
         is_causal: bool, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v, scale = 1/√d unless given; k / v may have fewer heads than q (a divisor:
    grouped-query attention); a float mask is added to the scores, a bool mask keeps the True positions."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not SDPA_HAS_GQA:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        groups = 1
    extra = {"enable_gqa": True} if groups > 1 else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                          scale=scale, **extra)


_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_loading(allowed: list[type] | tuple[type, ...] = ()) -> Iterator[None]:
    """Within the block no torch.load can run code from a file: torch's restricted unpickler is forced on every
    call (torch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at each load, 2.4 and later), and only the plain data classes
    in `allowed` may be rebuilt besides tensors and containers. A file that needs anything else fails to load
    (`pickle.UnpicklingError`), which carries the file's path (`LOADED_FILE`: the library's message names none)."""
    if allowed:
        torch.serialization.add_safe_globals(list(allowed))
    before = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    load = torch.load

    def load_naming_the_file(f, *args, **kwargs):
        try:
            return load(f, *args, **kwargs)
        except Exception as exc:
            if isinstance(f, str | os.PathLike):
                setattr(exc, LOADED_FILE, os.path.realpath(f))  # through the links zero_to_fp32 reads
            raise

    torch.load = load_naming_the_file
    try:
        yield
    finally:
        torch.load = load
        if before is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = before
