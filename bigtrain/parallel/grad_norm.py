"""The gradient norm of the whole model when its parameters are spread over a model-parallel group.

    ‖g‖² = Σ_ranks Σ_{sharded p on the rank} ‖g_p‖²  +  Σ_{replicated p} ‖g_p‖²

Sharded parameters (marked `tensor_model_parallel`) are summed over every rank of the model-parallel group;
replicated ones are identical on all tensor ranks and counted once, on tensor rank 0 (DeepSpeed's rule).
Under expert parallelism the routed experts' squares are also summed over the expert group (each of its ranks
holds other experts; the expert-data group's ranks hold the same ones and count them once each).
Copies of a tied module on later pipeline stages (DeepSpeed marks them `ds_pipe_replicated`) are skipped:
the first stage that holds it counts it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.compat.deepspeed import is_tied_copy
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.models.inspect import model_piece
from bigtrain.parallel.expert import is_expert_parallel
from bigtrain.parallel.tensor import is_tensor_parallel


def _squares(parameters: Iterable[torch.Tensor], groups: ParallelGroups | None, device: torch.device,
             experts: bool | None = None) -> torch.Tensor:
    """This rank's share of Σ‖g‖² (float64 scalar on `device`, summed there in parameter order): its shards,
    plus replicated parameters on tensor rank 0 (every parameter without `groups`: one process). Each tensor's
    Σ g² is a pairwise fp32 reduction, the sum over tensors float64: within 1e-7 of a float64 reference, where
    torch's foreach norm on CPU was 5e-6 off. Nothing is read on the host. `experts`: only the routed experts'
    parameters (True), only the others (False), or all (None)."""
    count_replicated = groups is None or groups.get_tensor_model_parallel_rank() == 0
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in {id(p): p for p in parameters if p.grad is not None}.values():
        if is_tied_copy(p) or (experts is not None and is_expert_parallel(p) != experts):
            continue
        if is_tensor_parallel(p) or count_replicated:
            total += p.grad.detach().float().square().sum().double().to(device)
    return total


def _sum_over_model(t: torch.Tensor, groups: ParallelGroups | None) -> torch.Tensor:
    if groups is not None and groups.get_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=groups.get_model_parallel_group())
    return t


def global_grad_norm(parameters: Iterable[torch.Tensor], groups: ParallelGroups | None,
                     device: torch.device) -> torch.Tensor:
    """‖g‖ of the whole model: a 0-dim float64 tensor on `device` (reading it waits for the device)."""
    if groups is None or groups.expert_group is None:
        return _sum_over_model(_squares(parameters, groups, device).reshape(1), groups).sqrt().reshape(())
    parameters = list(parameters)
    routed = _squares(parameters, groups, device, experts=True).reshape(1)
    dist.all_reduce(routed, group=groups.expert_group)
    squares = _squares(parameters, groups, device, experts=False).reshape(1) + routed
    return _sum_over_model(squares, groups).sqrt().reshape(())


def sharded_grad_norm(parameters: Iterable[torch.Tensor], groups: ParallelGroups, device: torch.device,
                      data_group: dist.ProcessGroup | None) -> torch.Tensor:
    """‖g‖ when each data-parallel rank holds the reduced gradients of only the parameters it owns (fairscale's
    OSS + ShardedDataParallel: pass those, and the data group) or all of them (data_group None)."""
    squares = _squares(parameters, groups, device).reshape(1)
    if data_group is not None:
        dist.all_reduce(squares, group=data_group)
    return _sum_over_model(squares, groups).sqrt().reshape(())


@torch.no_grad()
def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float, groups: ParallelGroups | None,
                   device: torch.device) -> torch.Tensor:
    """Scale gradients by min(1, max_norm / (‖g‖ + 1e-6)) as torch.nn.utils.clip_grad_norm_ does, with ‖g‖
    the whole model's norm; returns ‖g‖ before clipping (0-dim float64 on `device`). max_norm <= 0 only
    measures. The factor stays on the device: gradients are always multiplied by it, and a factor of exactly
    1 leaves them bitwise unchanged."""
    norm = global_grad_norm(parameters, groups, device)
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return norm


def piece_grad_norms(model: nn.Module, groups: ParallelGroups) -> dict[str, float]:
    """‖g‖ of each piece of the model (embed, every block, head), whole across the tensor group (read on the
    host: one wait for the device)."""
    by_piece: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        by_piece.setdefault(model_piece(name), []).append(p)
    keys = sorted(by_piece)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")  # a stage holds some
    ep = groups.expert_group is not None
    squares = torch.stack([_squares(by_piece[k], groups, device, experts=False if ep else None) for k in keys])
    if ep:  # the routed experts of a piece live across the expert group
        routed = torch.stack([_squares(by_piece[k], groups, device, experts=True) for k in keys])
        dist.all_reduce(routed, group=groups.expert_group)
        squares = squares + routed
    return dict(zip(keys, _sum_over_model(squares, groups).sqrt().tolist(), strict=True))


@torch.no_grad()
def clip_sharded(values: list[torch.Tensor], max_norm: float, groups: ParallelGroups,
                 device: torch.device) -> torch.Tensor:
    """`clip_grad_norm` when each data rank holds its rows of every parameter's reduced gradient (FSDP2 stages):
    Σ‖g‖² over this rank's rows, summed over the data group, then as `global_grad_norm` over the model-parallel
    group; the rows are scaled by min(1, max_norm / (‖g‖ + 1e-6)) (max_norm <= 0 only measures)."""
    norm = sharded_grad_norm(values, groups, device, groups.data_group)
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for v in values:
            if v.grad is not None:
                v.grad.mul_(coef.to(v.grad.dtype))
    return norm


def sharded_piece_norms(model: nn.Module, values: list[torch.Tensor], groups: ParallelGroups,
                        device: torch.device) -> dict[str, float]:
    """`piece_grad_norms` when this rank holds `values`, its rows of its stages' parameters (FSDP2 stages, named
    by `piece_name`): each piece's squares summed over the data group, then over the model-parallel group. The
    pieces are the whole model's (`model` lists every parameter name on every rank, meta where another rank
    holds it)."""
    keys = sorted({model_piece(name) for name, _ in model.named_parameters()})
    by_piece: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for v in values:
        by_piece[model_piece(v.piece_name)].append(v)
    squares = torch.stack([_squares(by_piece[k], groups, device) for k in keys])
    dist.all_reduce(squares, group=groups.data_group)
    return dict(zip(keys, _sum_over_model(squares, groups).sqrt().tolist(), strict=True))
