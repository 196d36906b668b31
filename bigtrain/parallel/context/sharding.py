"""How a sequence is split over the C ranks of a context group (context parallelism).

The sequence of length S is cut into 2C chunks of S/(2C) tokens; rank i holds chunks i and 2C-1-i, in that
order (the "zig-zag" split):

    C = 2, S = 8:   chunks  [0 1 | 2 3 | 4 5 | 6 7]        rank 0: chunks 0, 3 -> positions 0 1 6 7
                                                           rank 1: chunks 1, 2 -> positions 2 3 4 5

Under a causal mask query p attends p + 1 keys, so the work of a chunk grows with its index; pairing chunk i
with chunk 2C-1-i gives every rank (i + 1) + (2C - i) = 2C + 1 chunk-units of work, the same on every rank.
Bidirectional attention uses the same split: there every split balances the work, and one split for every
family keeps one rule for positions, document ids, padding and the loss (a contiguous split would save
nothing and would need a second code path).

Everything per token that the model reads beside the activations is computed on the full sequence and then
sharded the same way: the global positions (`global_positions`: rotary, learned and sinusoidal tables, T5's
relative bias, which depends on key position minus query position), document positions
(`bigtrain.models.documents.document_positions` of the full ids, then `shard_sequence`), document ids and
padding masks.

The order in which the ranks' shards stand one after the other ("rank-major order", `rank_major_order`) is
what an all-gather or an all-to-all over the group returns; `unshard_sequence` undoes it.
"""

from __future__ import annotations

import torch

from bigtrain.errors import ConfigError


def check_context_split(seq_len: int, context: int) -> None:
    """Refuse a sequence the zig-zag split cannot cut: S must be a multiple of 2C (2C equal chunks)."""
    if context < 1:
        raise ConfigError(f"parallel.context={context}: the context-parallel size must be a positive integer")
    if seq_len % (2 * context):
        raise ConfigError(
            f"data.seq_len={seq_len} cannot be split over parallel.context={context}: context parallelism cuts "
            f"each sequence into 2 × parallel.context = {2 * context} equal chunks, so data.seq_len must be a "
            f"multiple of {2 * context} (for example {seq_len + (-seq_len) % (2 * context)})")


def chunk_indices(context: int, rank: int) -> tuple[int, int]:
    """The two chunks (of 2C) that rank `rank` holds, in the order it holds them: (i, 2C-1-i)."""
    if not 0 <= rank < context:
        raise ValueError(f"rank {rank} is not in a context group of {context}")
    return rank, 2 * context - 1 - rank


def global_positions(seq_len: int, context: int, rank: int, device: torch.device | str | None = None
                     ) -> torch.Tensor:
    """int64 [S/C]: the position in the full sequence of each token this rank holds, in its local order."""
    check_context_split(seq_len, context)
    chunk = seq_len // (2 * context)
    first, second = chunk_indices(context, rank)
    steps = torch.arange(chunk, device=device)
    return torch.cat([first * chunk + steps, second * chunk + steps])


def rank_major_order(seq_len: int, context: int, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 [S]: the global positions of rank 0's tokens, then rank 1's, ...: the order of a gathered sequence."""
    return torch.cat([global_positions(seq_len, context, r, device) for r in range(context)])


def shard_sequence(x: torch.Tensor, context: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a full-sequence tensor (sequence along `dim`: [B, S, ...] by default), a copy."""
    seq_len = x.shape[dim]
    check_context_split(seq_len, context)
    return x.index_select(dim, global_positions(seq_len, context, rank, x.device))


def reorder_to_natural(x: torch.Tensor, context: int, dim: int = 1) -> torch.Tensor:
    """A sequence in rank-major order (the ranks' shards concatenated) back in the natural order 0..S-1."""
    order = rank_major_order(x.shape[dim], context, x.device)
    return x.index_select(dim, torch.argsort(order))


def unshard_sequence(local: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's shard: all-gather over the context group, then the natural order.

    For values (outputs, tests, generation after training); not differentiable."""
    import torch.distributed as dist

    context = dist.get_world_size(group=group)
    moved = local.detach().movedim(dim, 0).contiguous()
    pieces = [torch.empty_like(moved) for _ in range(context)]
    dist.all_gather(pieces, moved, group=group)
    return reorder_to_natural(torch.cat(pieces).movedim(0, dim), context, dim)
