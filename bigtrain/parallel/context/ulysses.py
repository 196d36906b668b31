"""DeepSpeed-Ulysses attention (Jacobs et al. 2023, `deepspeed.sequence`): exact attention over a sequence
split across the C ranks of a context group, by trading the sequence split for a head split.

    q, k, v  [B, H, S/C, d]  (this rank's tokens, every head)
      --all-to-all-->  [B, H/C, S, d]   (every token, this rank's H/C heads)
      attention over the full sequence with the full mask, one device's computation for those heads
      --all-to-all-->  [B, H, S/C, d]

Heads are independent, so this is attention itself. The gathered sequence stands in rank-major order (rank 0's
zig-zag chunks, then rank 1's, ...); attention is equivariant under a permutation of the tokens when the mask
is permuted with them, so the mask is built in that order from global positions (`tokens.allowed`). Plain causal
attention (no documents, no padding) is the exception: there the heads are put in the natural order 0..S-1 and
back (two index copies), so that the kernel runs with `is_causal` and builds no [S, S] mask, which would be as
large as one device's and would not shrink with C. The all-to-all is an autograd function whose backward is
the inverse all-to-all.

Grouped-query attention splits the H_kv key/value heads the same way: rank r takes query heads
[r·H/C, (r+1)·H/C) and key/value heads [r·H_kv/C, (r+1)·H_kv/C), which are exactly the ones those query heads
use. So H and H_kv must both be multiples of C (`check_ulysses_heads`). Communication per layer: four
all-to-alls forward (q, k, v, output), each moving (C-1)/C of the tensor; the memory of the local attention is
that of one device for H/C heads (scores [S, S] per head if the kernel materializes them).

bigtrain's own implementation rather than `deepspeed.sequence.layer.DistributedAttention`: the mask in
rank-major order and grouped-query heads need the layout in hand, and the dependency stays optional.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from bigtrain.compat.torch import sdpa
from bigtrain.errors import ConfigError
from bigtrain.parallel.context.tokens import Tokens, allowed, concat_tokens, everyone


def check_ulysses_heads(n_heads: int, n_kv_heads: int, context: int) -> None:
    """Ulysses gives each rank H/C query heads and H_kv/C key/value heads: both must divide."""
    for key, heads in (("model.n_heads", n_heads), ("model.n_kv_heads", n_kv_heads)):
        if heads % context:
            raise ConfigError(
                f"{key}={heads} cannot be split over parallel.context={context} with "
                f"parallel.context_attention=ulysses: each rank of the context group takes {key}/parallel.context "
                f"heads, so {key} must be a multiple of {context}; use a head count that is, a smaller "
                f"parallel.context, or parallel.context_attention=ring (any head count)")


def _sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, T, d] (own tokens, all heads) -> [B, H/C, C·T, d] (all tokens in rank-major order, own heads)."""
    size = dist.get_world_size(group=group)
    b, h, t, d = x.shape
    send = x.reshape(b, size, h // size, t, d).transpose(0, 1).contiguous()  # piece r: rank r's heads
    received = torch.empty_like(send)  # piece r: rank r's tokens
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * t, d)


def _heads_to_sequence(y: torch.Tensor, group) -> torch.Tensor:
    """The inverse: [B, H/C, C·T, d] -> [B, H, T, d]."""
    size = dist.get_world_size(group=group)
    b, h_local, s, d = y.shape
    send = y.reshape(b, h_local, size, s // size, d).permute(2, 0, 1, 3, 4).contiguous()  # piece r: rank r's tokens
    received = torch.empty_like(send)  # piece r: rank r's heads
    dist.all_to_all_single(received, send, group=group)
    return received.transpose(0, 1).reshape(b, size * h_local, s // size, d)


class SequenceToHeads(torch.autograd.Function):
    """Forward `_sequence_to_heads`; backward its inverse (an all-to-all is a permutation of the elements)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad, ctx.group), None


class HeadsToSequence(torch.autograd.Function):
    """Forward `_heads_to_sequence`; backward `_sequence_to_heads`."""

    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return _heads_to_sequence(y, group)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad, ctx.group), None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens | Sequence[Tokens], group,
                      causal: bool, scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, d], k/v [B, H_kv, T, d]: this rank's T = S/C tokens, described by `tokens` (or every rank's,
    `gather_tokens`) -> the attention output of those tokens [B, H, T, d]. scale None means 1/√d. bias:
    [1 or B, H, S, S] added to the scores of the whole sequence in rank-major order, the same on every rank
    (each rank adds its own heads' part; its gradient holds those heads only)."""
    size = dist.get_world_size(group=group)
    check_ulysses_heads(q.shape[1], k.shape[1], size)
    full = concat_tokens(everyone(tokens, group))
    qh, kh, vh = (SequenceToHeads.apply(t, group) for t in (q, k, v))
    if causal and full.document_ids is None and full.key_padding is None and bias is None:
        # plain causal: in the natural order the kernel needs no [S, S] mask (flash attention where it runs)
        natural = torch.argsort(full.positions)
        qh, kh, vh = (t.index_select(2, natural) for t in (qh, kh, vh))
        out = sdpa(qh, kh, vh, None, 0.0, is_causal=True, scale=scale).index_select(2, torch.argsort(natural))
    else:
        mask = allowed(full, full, causal)
        if bias is not None:
            heads = qh.shape[1]
            own = bias[:, dist.get_rank(group=group) * heads:(dist.get_rank(group=group) + 1) * heads].to(q.dtype)
            mask = own if mask is None else own.masked_fill(~mask, float("-inf"))
        out = sdpa(qh, kh, vh, mask, 0.0, is_causal=False, scale=scale)
    return HeadsToSequence.apply(out, group)
