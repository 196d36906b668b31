"""Work done by rank 0 alone whose outcome every rank must share: the result, or the error, is broadcast, so
all ranks go on together or stop with the same message (instead of the others waiting for a rank 0 that left);
and small facts every rank must agree on (counts summed, values gathered), all on the host group."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from bigtrain.distributed.groups import ParallelGroups
from bigtrain.errors import BigtrainError

T = TypeVar("T")


def on_main(is_main: bool, groups: ParallelGroups | None, work: Callable[[], T]) -> T | None:
    """`work()` on rank 0; its picklable result on every rank (broadcast on the host group of `groups`; None:
    one process). A BigtrainError raised there is raised on every rank (with the same message and type); other
    exceptions end rank 0 as usual."""
    message: list = [None, None]  # result, error
    if is_main:
        try:
            message = [work(), None]
        except BigtrainError as err:
            message = [None, err]
    if groups is not None:
        torch.distributed.broadcast_object_list(message, src=0, group=groups.host_world)
    result, error = message
    if error is not None:
        raise error
    return result


def sum_on_ranks(groups: ParallelGroups | None, values: list[int]) -> list[int]:
    """Each of `values` summed over every rank (one all-reduce on the host group; None: one process)."""
    if groups is None:
        return list(values)
    total = torch.tensor(values, dtype=torch.int64)
    torch.distributed.all_reduce(total, group=groups.host_world)
    return [int(v) for v in total.tolist()]


def gather_on_ranks(groups: ParallelGroups | None, value: T) -> list[T]:
    """Every rank's picklable `value`, in rank order, on every rank (None: one process)."""
    if groups is None:
        return [value]
    out: list = [None] * torch.distributed.get_world_size(groups.host_world)
    torch.distributed.all_gather_object(out, value, group=groups.host_world)
    return out
