"""Work done by rank 0 alone whose outcome every rank must share: the result, or the error, is broadcast, so
all ranks go on together or stop with the same message (instead of the others waiting for a rank 0 that left)."""

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
