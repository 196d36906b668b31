"""Every use of fairscale's FullyShardedDataParallel (FSDP) internals, in one place.

bigtrain wraps modules in FSDP through its public constructor and runs them through `forward`; to write and
read layout-free checkpoints it also needs how FSDP stores a parameter, which is private:

    p._is_sharded   whether FSDP replaced `p.data` by this rank's shard (it does when its group has > 1 rank)
    p._orig_size    the parameter's shape before sharding
    shard           torch.chunk(flatten(p), W)[rank], padded with zeros to the first chunk's length:
                    c = ⌈n / W⌉ values from r·c (fewer, or none, on the last ranks)
    names           FSDP inserts `_fsdp_wrapped_module` (and `_fpw_module`) into the names of what it wraps

These were read from fairscale 0.4.13 (pyproject: fairscale>=0.4.13), which runs FSDP on CUDA only (it creates
CUDA streams for its all-gathers and reductions); `fsdp_runs_on` is the one place that says so. Importing this
module does not import fairscale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from bigtrain.compat.deepspeed import Partition

WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_fpw_module"})


def fsdp_runs_on(device_type: str) -> bool:
    """Whether fairscale's FSDP runs on this kind of device (its streams are CUDA streams)."""
    return device_type == "cuda"


def clean_name(name: str) -> str:
    """A parameter's name in the unwrapped model: FSDP's wrapper modules taken out."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def named_unwrapped_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name in the unwrapped model, parameter) for every parameter of `model`, tied ones once."""
    for name, p in model.named_parameters():
        yield clean_name(name), p


def is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "_is_sharded", False))


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of a parameter (of its tensor shard) before FSDP sharded it."""
    return p._orig_size if is_sharded(p) else p.shape


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, count) of the values of a flattened n-value parameter that rank `rank` of `world_size` holds:
    torch.chunk's split, c = ⌈n / W⌉ values per rank, the last ranks short or empty."""
    chunk = math.ceil(numel / world_size)
    start = min(rank * chunk, numel)
    return start, min(chunk, numel - start)


def fsdp_partition(p: torch.Tensor, rank: int, world_size: int) -> Partition:
    """Where this rank's values of a sharded parameter are: `p` itself is the flat (padded) shard, and its
    optimizer state has the same layout."""
    start, count = shard_range(full_shape(p).numel(), rank, world_size)
    return Partition(flat=p, flat_start=0, param_start=start, numel=count)
