"""Ring attention: exact softmax attention over a sequence split across the C ranks of a context group.

Each rank holds the queries, keys and values of its own tokens (`sharding`: the zig-zag chunks). The K/V
blocks travel around the ring (`exchange`: rank r sends to r + 1), so at step t rank r attends its queries to
the block of rank (r - t) mod C; after C steps it has seen every key. The block results are merged with the
log-sum-exp rule (online softmax): for a query row with running output o and log-normalizer ℓ, and a block
with o_b = softmax(s_b) v_b and ℓ_b = logsumexp(s_b),

    ℓ' = log(e^ℓ + e^ℓ_b),    o' = e^(ℓ - ℓ') o + e^(ℓ_b - ℓ') o_b

which is exactly softmax over the union of the keys (a row that sees no key of a block has ℓ_b = -∞ and
contributes nothing). Masks come from global positions, documents and padding (`tokens.allowed`), so causal
attention across the zig-zag chunks, bidirectional attention, document masking and padding all hold.

Under a causal mask a query chunk never sees a later key chunk, and whole chunk pairs are skipped
(`visible_parts`): every rank computes 1/2 + 1/(4C) of its C blocks, the same on every rank.

Backward (exact, as FlashAttention-2's): with the final ℓ saved, each block's probabilities are recomputed,
P = exp(s - ℓ), and with D = rowsum(dO ∘ O):

    dV_b += Pᵀ dO,   dS = P ∘ (dO V_bᵀ - D),   dQ += dS K_b · scale,   dK_b += dSᵀ Q · scale

The K/V blocks go around the ring again together with their dK/dV accumulators; after the last step one more
send brings every accumulator back to the rank that owns the block. Grouped-query attention (H query heads
over H_kv key/value heads, query head h using key/value head h // (H/H_kv)) sums dK/dV over each group.
Scores, outputs and gradients accumulate in fp32 (inputs may be 16-bit), ℓ in fp64 (a few numbers per
query: it carries the scores' magnitude, which fp32 would round to a relative 1e-6). No dropout.

An additive bias of the whole sequence (T5's relative one, in rank-major order, the same on every rank) is added
to each block's scores; its gradient dS is kept for this rank's query rows only, so the sum over the context
ranks is the whole gradient (which the data × context reduction of the table's gradient takes).

Per rank the attention keeps q, k, v, the output and ℓ for backward (O(S/C) each) and works on one
[S/C, S/C] score block at a time: the working memory is 1/C (saved) and 1/C² (scores) of one device's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from bigtrain.parallel.context import exchange
from bigtrain.parallel.context.tokens import Tokens, allowed, everyone

KV_TAG, GRAD_TAG = 1, 2  # two transfers may be in flight between the same two ranks in backward


def _wide(t: torch.Tensor) -> torch.Tensor:
    """The accumulation type: fp32 (fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, T, d] -> [B, H_kv, H/H_kv, T, d] fp32: query head h = kv · group + g uses key/value head kv."""
    b, h, t, d = q.shape
    return _wide(q).reshape(b, kv_heads, h // kv_heads, t, d)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """s = q kᵀ · scale (+ bias), -∞ where the mask forbids: q [B, Hkv, G, Tq, d], k [B, Hkv, Tk, d], bias
    [1 or B, Hkv, G, Tq, Tk] -> [B, Hkv, G, Tq, Tk]."""
    s = torch.einsum("bhgqd,bhkd->bhgqk", q, _wide(k)).mul_(scale)  # in place: one [Tq, Tk] block alive
    if bias is not None:
        s += bias
    if mask is not None:
        s.masked_fill_(~mask[:, :, None], float("-inf"))
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """ℓ with -∞ (a row that saw no key) replaced by 0, so that exp(s - ℓ) gives 0 there instead of NaN."""
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: (o_b = softmax(s) v [B, Hkv, G, Tq, d] in the accumulation type, ℓ_b = logsumexp(s)
    [B, Hkv, G, Tq] in fp64). ℓ_b = m + log Σ exp(s - m) with m the row maximum: the shift is exact and the
    sum is small, so only the fp64 addition carries ℓ's magnitude (in fp32 one rounding of ℓ ≈ 16 is 2e-6, a
    relative error every probability would inherit)."""
    s = _scores(q, k, mask, scale, bias)
    top = _finite(s.amax(dim=-1))
    p = s.sub_(top[..., None]).exp_()
    total = p.sum(dim=-1)
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, _wide(v)) / total.masked_fill(total == 0, 1.0)[..., None]
    return out, top.double() + torch.log(total).double()


def merge(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-sum-exp merge of a running (o, ℓ) with a block's (o_b, ℓ_b); weights in ℓ's type (fp64)."""
    new = torch.logaddexp(lse, lse_b)
    safe = _finite(new)
    weight, weight_b = (torch.exp(x - safe).to(out.dtype)[..., None] for x in (lse, lse_b))
    return out * weight + out_b * weight_b, new


def block_backward(q, k, v, d_out, delta, lse, mask, scale, bias=None):
    """One block's contribution (dQ, dK_b, dV_b, dS) in the accumulation type, from the final ℓ (fp64) and
    D = rowsum(dO ∘ O); dS is also the gradient of an additive bias. P = exp(s - ℓ) = exp(s - m) · exp(m - ℓ), m
    the block's row maximum: the large magnitudes cancel in fp64 (as in `block_forward`)."""
    s = _scores(q, k, mask, scale, bias)
    top = _finite(s.amax(dim=-1))
    p = s.sub_(top[..., None]).exp_().mul_(torch.exp(top.double() - lse).to(s.dtype)[..., None])
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, d_out)
    ds = torch.einsum("bhgqd,bhkd->bhgqk", d_out, _wide(v)).sub_(delta[..., None]).mul_(p)
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, _wide(k)) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, q) * scale
    return dq, dk, dv, ds


def _grouped_bias(bias: torch.Tensor | None, kv_heads: int) -> torch.Tensor | None:
    """[1 or B, H, S, S] -> [1 or B, H_kv, H/H_kv, S, S] in the accumulation type (as `_grouped`)."""
    if bias is None:
        return None
    b, h, s, t = bias.shape
    return _wide(bias.detach()).reshape(b, kv_heads, h // kv_heads, s, t)


def _bias_block(bias: torch.Tensor | None, rank: int, source: int, length: int, rows: slice, cols: slice
                ) -> torch.Tensor | None:
    """The part of a rank-major [.., S, S] bias for this rank's query `rows` and the `cols` of `source`'s keys."""
    if bias is None:
        return None
    return bias[..., rank * length + rows.start:rank * length + rows.stop,
                source * length + cols.start:source * length + cols.stop]


def visible_parts(q_positions: list[int], k_positions: list[int], causal: bool) -> list[tuple[slice, slice]]:
    """The (query rows, key columns) sub-blocks of a block worth computing. Without a causal mask, the whole
    block. With one, each half of the queries (a zig-zag chunk) against the key halves (chunks) whose first
    position is not after the query half's last: a pair of chunks is either wholly visible, wholly hidden or
    the diagonal. The zig-zag split hides one of the four chunk pairs of a rank's own block and two of the four
    of every other block, on every rank alike: the causal work is 1/2 + 1/(4C) of the full blocks. The mask
    still applies inside what is computed (the diagonal, documents, padding); skipping only drops exact zeros."""
    rows_all, cols_all = slice(0, len(q_positions)), slice(0, len(k_positions))
    if not causal:
        return [(rows_all, cols_all)]
    parts = []
    for rows in _halves(len(q_positions)):
        last = max(q_positions[rows])
        seen = [cols for cols in _halves(len(k_positions)) if min(k_positions[cols]) <= last]
        if seen:
            parts.append((rows, slice(seen[0].start, seen[-1].stop)))
    return parts


def _halves(length: int) -> list[slice]:
    """The two halves of a shard (its two chunks), or the whole of a one-token shard."""
    return [slice(0, length)] if length < 2 else [slice(0, length // 2), slice(length // 2, length)]


class RingAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) v over the whole sequence, with q/k/v this rank's shard (see the module)."""

    @staticmethod
    def forward(ctx, q, k, v, tokens: Tokens | Sequence[Tokens], group, causal: bool, scale: float,
                bias: torch.Tensor | None = None):
        size, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        ranks = everyone(tokens, group)
        kv_heads = k.shape[1]
        qg = _grouped(q, kv_heads)
        bias_g = _grouped_bias(bias, kv_heads)
        out = torch.zeros_like(qg)
        lse = torch.full(qg.shape[:-1], float("-inf"), dtype=torch.float64, device=q.device)
        block = torch.stack([k, v])
        positions = [t.positions.tolist() for t in ranks]  # on the host once: which sub-blocks to compute
        for step in range(size):
            pending = exchange.start(block, group, KV_TAG) if step < size - 1 else None
            source = (rank - step) % size
            mask = allowed(ranks[rank], ranks[source], causal)
            for rows, cols in visible_parts(positions[rank], positions[source], causal):
                o_b, lse_b = block_forward(qg[..., rows, :], block[0][..., cols, :], block[1][..., cols, :],
                                           None if mask is None else mask[..., rows, cols], scale,
                                           _bias_block(bias_g, rank, source, q.shape[2], rows, cols))
                out[..., rows, :], lse[..., rows] = merge(out[..., rows, :], lse[..., rows], o_b, lse_b)
            if pending is not None:
                block = pending.wait()
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.ranks, ctx.positions, ctx.group, ctx.causal, ctx.scale = ranks, positions, group, causal, scale
        return out.reshape(q.shape).to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, bias = ctx.saved_tensors
        group, ranks, scale = ctx.group, ctx.ranks, ctx.scale
        size, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        kv_heads = k.shape[1]
        qg, dog = _grouped(q, kv_heads), _grouped(d_out, kv_heads)
        bias_g = _grouped_bias(bias, kv_heads)
        d_bias = torch.zeros_like(bias_g) if bias_g is not None and ctx.needs_input_grad[7] else None
        delta = (dog * out).sum(-1)
        dq = torch.zeros_like(qg)
        block = torch.stack([k, v])
        grads = torch.zeros(block.shape, dtype=qg.dtype, device=q.device)  # dK, dV of the block held
        for step in range(size):
            pending = exchange.start(block, group, KV_TAG) if step < size - 1 else None
            source = (rank - step) % size
            mask = allowed(ranks[rank], ranks[source], ctx.causal)
            for rows, cols in visible_parts(ctx.positions[rank], ctx.positions[source], ctx.causal):
                here = _bias_block(bias_g, rank, source, q.shape[2], rows, cols)
                dq_b, dk_b, dv_b, ds = block_backward(qg[..., rows, :], block[0][..., cols, :], block[1][..., cols, :],
                                                      dog[..., rows, :], delta[..., rows], lse[..., rows],
                                                      None if mask is None else mask[..., rows, cols], scale, here)
                if d_bias is not None:  # this rank's query rows only: the other ranks add theirs to the table
                    _bias_block(d_bias, rank, source, q.shape[2], rows, cols).add_(
                        ds.sum(0, keepdim=True) if d_bias.shape[0] == 1 else ds)
                dq[..., rows, :] += dq_b
                grads[0][..., cols, :] += dk_b
                grads[1][..., cols, :] += dv_b
            if size > 1:  # pass the accumulators on with their block; the last send returns them to the owner
                grads = exchange.start(grads, group, GRAD_TAG).wait()
            if pending is not None:
                block = pending.wait()
        d_bias = None if d_bias is None else d_bias.reshape(bias.shape).to(bias.dtype)
        return (dq.reshape(q.shape).to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None, None,
                d_bias)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens | Sequence[Tokens], group,
                   causal: bool, scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, d], k/v [B, H_kv, T, d] (H a multiple of H_kv): this rank's T = S/C tokens, described by
    `tokens` (global positions, documents, padding; or every rank's, `gather_tokens`) -> the attention output
    of those tokens [B, H, T, d]. scale None means 1/√d. bias: [1 or B, H, S, S] added to the scores of the
    whole sequence in rank-major order (rank r's queries and keys at r·T..(r+1)·T; T5's relative bias), the
    same on every rank; its gradient holds this rank's query rows (the sum over ranks is the whole)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return RingAttention.apply(q, k, v, tokens, group, causal, scale, bias)
