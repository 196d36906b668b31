"""The tensor-parallel collectives as autograd functions (Megatron's f / g and their sequence-parallel duals).

Each forward has the backward that makes the gradient exact:

    copy_to_tensor_region       forward: identity            backward: all-reduce      (Megatron's f)
    reduce_from_tensor_region   forward: all-reduce          backward: identity        (Megatron's g)
    gather_sequence             forward: all-gather (seq)    backward: reduce-scatter  (sequence parallel f)
    reduce_scatter_sequence     forward: reduce-scatter      backward: all-gather      (sequence parallel g)
    split_sequence              forward: keep own chunk      backward: all-gather
    exchange_rows               forward: all-to-all (rows,   backward: the inverse all-to-all (expert
                                uneven splits)                parallelism's token dispatch and combine)

A replicated tensor entering a sharded computation goes through f: every rank's backward holds only its
shards' share of the gradient, and the all-reduce sums them. Partial sums leaving it go through g.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bigtrain.compat.torch import all_gather_into, reduce_scatter_into


def _size(group) -> int:
    return dist.get_world_size(group=group)


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * moved.shape[0], *moved.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_into(out, moved, group)
    # contiguous once here: every projection that reads the gathered input then flattens it without a copy of
    # its own (Q, K and V would otherwise each save a separate copy for backward)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    moved = x.movedim(dim, 0).contiguous()
    if moved.shape[0] % n:
        raise ValueError(f"dimension {dim} of size {moved.shape[0]} does not split into {n} equal chunks")
    out = torch.empty((moved.shape[0] // n, *moved.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_into(out, moved, group)
    return out.movedim(0, dim)


def _chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n, rank = _size(group), dist.get_rank(group=group)
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split into {n} equal chunks")
    return x.chunk(n, dim=dim)[rank].contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _SplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _chunk(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


def _all_to_all_rows(x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(receive), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
    return out


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, receive, group):
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return _all_to_all_rows(x, send, receive, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_rows(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def copy_to_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return _GatherSequence.apply(x, group, dim)


def reduce_scatter_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return _ReduceScatterSequence.apply(x, group, dim)


def split_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return _SplitSequence.apply(x, group, dim)


def exchange_rows(x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
    """Rows of `x` to the ranks of `group`: the first send[0] rows to rank 0, the next send[1] to rank 1, ...;
    returns the rows received, receive[r] from rank r in rank order (any split may be 0). The gradient goes back
    the same way: an all-to-all with the splits swapped."""
    return _ExchangeRows.apply(x, send, receive, group)


@torch.no_grad()
def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather of shards along the last dimension, without gradient (e.g. logits for sampling)."""
    return _all_gather(x, group, x.dim() - 1)
