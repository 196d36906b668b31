"""The gradient norm of the whole model when its parameters are spread over a model-parallel group.

    ‖g‖² = Σ_ranks Σ_{sharded p on the rank} ‖g_p‖²  +  Σ_{replicated p} ‖g_p‖²

Sharded parameters (marked `tensor_model_parallel`) are summed over every rank of the model-parallel group;
replicated ones are identical on all tensor ranks and counted once, on tensor rank 0 (DeepSpeed's rule).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from bigtrain.parallel.layout import ParallelGroups
from bigtrain.parallel.tensor import is_tensor_parallel


def global_grad_norm(parameters: Iterable[torch.Tensor], groups: ParallelGroups) -> float:
    unique = {id(p): p for p in parameters if p.grad is not None}.values()
    count_replicated = groups.get_tensor_model_parallel_rank() == 0
    squares = None
    for p in unique:
        if is_tensor_parallel(p) or count_replicated:
            s = p.grad.detach().float().square().sum()
            squares = s if squares is None else squares + s
    if squares is None:
        squares = torch.zeros((), dtype=torch.float32)
    total = squares.double().reshape(1)
    if groups.get_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=groups.get_model_parallel_group())
    return float(total.sqrt())
