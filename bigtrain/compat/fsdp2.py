"""PyTorch's FSDP2 (`fully_shard`) as bigtrain uses it, in one place.

    fully_shard, MixedPrecisionPolicy   torch.distributed.fsdp (torch >= 2.6), torch.distributed._composable.fsdp
                                        before
    data_mesh                           a 1-D DeviceMesh over a process group bigtrain already made
                                        (DeviceMesh.from_group): FSDP2 shards over the layout's data group, and no
                                        group is created here
    local_values                        a sharded parameter's (a DTensor's) local rows as one flat tensor that
                                        shares their storage: writing it writes the parameter FSDP2 gathers
    sharded_like                        a DTensor laid out as a sharded parameter, from its local part
    row_range                           which rows of a parameter a data rank holds: FSDP2 shards dimension 0 as
                                        torch.chunk does, c = ⌈n / D⌉ rows from r·c (fewer, or none, on the last
                                        ranks), so a rank's rows are one contiguous range of the flattened
                                        parameter

Importing this module does not import torch.distributed's FSDP.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def fully_shard_api() -> tuple[Any, Any]:
    """(fully_shard, MixedPrecisionPolicy) of the installed torch."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def data_mesh(group: object, device_type: str) -> Any:
    """A 1-D DeviceMesh whose one dimension is `group` (its ranks in the group's order)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device_type)


@torch.no_grad()
def local_values(p: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the sharded parameter `p`, flat, sharing their storage (a leaf the optimizer may
    update in place)."""
    local = p.to_local()
    flat = local.view(-1)
    if local.numel() and flat.untyped_storage().data_ptr() != p._local_tensor.untyped_storage().data_ptr():
        raise RuntimeError("FSDP2's local shard is not a view of the parameter's storage")
    return flat


@torch.no_grad()
def local_grad(p: torch.Tensor) -> torch.Tensor | None:
    """This rank's rows of the (reduce-scattered) gradient of `p`, flat; None before a backward."""
    return None if p.grad is None else p.grad.to_local().reshape(-1)


def sharded_like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A DTensor laid out as the sharded parameter `p` whose local part is `local` (a gradient FSDP2 did not
    produce: a parameter its stage did not use)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.view_as(p.to_local()), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def row_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first row, row count) of a parameter of `rows` rows that data rank `rank` of `world_size` holds."""
    chunk = math.ceil(rows / world_size)
    start = min(rank * chunk, rows)
    return start, min(chunk, rows - start)
