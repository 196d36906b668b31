"""Context parallelism without processes: the zig-zag split, its positions and reordering, the refusals, the
mask over global positions, and the ring's block math (tests/test_context_parallel.py runs it over ranks)."""

from __future__ import annotations

import pytest
import torch

from bigtrain.errors import ConfigError
from bigtrain.models.attention import build_mask
from bigtrain.parallel.context import check_context_split, check_ulysses_heads, global_positions, shard_sequence
from bigtrain.parallel.context.ring import block_backward, block_forward, merge, visible_parts
from bigtrain.parallel.context.sharding import rank_major_order, reorder_to_natural
from bigtrain.parallel.context.tokens import Tokens, allowed


def test_zig_zag_positions():
    """Rank i holds chunks i and 2C-1-i of 2C: C = 2, S = 8 -> rank 0 [0 1 6 7], rank 1 [2 3 4 5]."""
    assert global_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert global_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert global_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    for context in (1, 2, 4, 8):
        seq = 8 * context
        every = torch.cat([global_positions(seq, context, r) for r in range(context)])
        assert sorted(every.tolist()) == list(range(seq))  # a partition of the sequence
        assert torch.equal(every, rank_major_order(seq, context))


@pytest.mark.parametrize("context", [2, 4])
def test_causal_work_is_the_same_on_every_rank(context):
    """Under a causal mask query p attends p + 1 keys: the zig-zag split gives every rank the same count."""
    seq = 16 * context
    work = [int((global_positions(seq, context, r) + 1).sum()) for r in range(context)]
    assert len(set(work)) == 1 and sum(work) == seq * (seq + 1) // 2


@pytest.mark.parametrize("context", [1, 2, 4])
def test_shard_then_gather_in_rank_order_gives_the_sequence_back(context):
    """shard_sequence on every rank, concatenated as an all-gather returns them, reorder_to_natural: identity
    (what unshard_sequence does after its all-gather), along any sequence dimension."""
    x = torch.randn(2, 8 * context, 3, 5)
    gathered = torch.cat([shard_sequence(x, context, r) for r in range(context)], dim=1)
    assert torch.equal(reorder_to_natural(gathered, context), x)
    y = x.transpose(1, 2)  # [B, H, S, d]
    assert torch.equal(reorder_to_natural(torch.cat([shard_sequence(y, context, r, dim=2) for r in range(context)],
                                                    dim=2), context, dim=2), y)


def test_a_sequence_that_cannot_be_split_is_refused_naming_the_keys():
    with pytest.raises(ConfigError, match=r"data\.seq_len=30 .*parallel\.context=4.*multiple of 8.*32"):
        check_context_split(30, 4)
    with pytest.raises(ConfigError, match=r"parallel\.context=0"):
        check_context_split(32, 0)
    with pytest.raises(ConfigError, match=r"data\.seq_len=10"):
        shard_sequence(torch.zeros(1, 10), 2, 0)
    check_context_split(32, 4)


def test_ulysses_refuses_heads_that_do_not_split_naming_the_keys():
    with pytest.raises(ConfigError, match=r"model\.n_heads=6 .*parallel\.context=4.*ulysses.*ring"):
        check_ulysses_heads(6, 6, 4)
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads=2 .*parallel\.context=4"):
        check_ulysses_heads(8, 2, 4)
    check_ulysses_heads(8, 4, 4)


def _documents_and_padding(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    docs = torch.zeros(2, seq, dtype=torch.int64)
    docs[0, [3, 9]] = 1
    docs[1, [5]] = 1
    docs = docs.cumsum(-1)
    padding = torch.ones(2, seq, dtype=torch.bool)
    padding[1, seq - 3:] = False
    return docs.masked_fill(~padding, -1), padding


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("context", [1, 2, 4])
def test_mask_over_global_positions_is_the_models_mask(causal, context):
    """`allowed` between any two shards is the matching block of build_mask over the full sequence."""
    seq = 16
    docs, padding = _documents_and_padding(seq)
    full = build_mask(seq, padding, causal, torch.device("cpu"), document_ids=docs if causal else None)

    def tokens(r: int) -> Tokens:
        return Tokens(global_positions(seq, context, r), shard_sequence(docs, context, r) if causal else None,
                      shard_sequence(padding, context, r))

    for i in range(context):
        for j in range(context):
            pi, pj = global_positions(seq, context, i), global_positions(seq, context, j)
            expected = full[:, :, pi][:, :, :, pj]
            assert torch.equal(allowed(tokens(i), tokens(j), causal).expand_as(expected), expected)
    assert allowed(Tokens(torch.arange(4)), Tokens(torch.arange(4)), causal=False) is None


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_ring_blocks_merged_equal_softmax_over_all_keys(with_bias):
    """block_forward over key blocks, merged by the log-sum-exp rule, is softmax attention over all keys (a
    block a row cannot see contributes nothing); block_backward summed over the blocks is autograd's gradient.
    Grouped-query: 4 query heads over 2 key/value heads. With an additive bias (T5's relative one, [1, ...]
    over the batch), its gradient is the blocks' dS summed over the batch."""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 2, 8, 4, dtype=torch.float64)  # [B, Hkv, G, T, d]
    k, v = torch.randn(2, 2, 12, 4, dtype=torch.float64), torch.randn(2, 2, 12, 4, dtype=torch.float64)
    bias = torch.randn(1, 2, 2, 8, 12, dtype=torch.float64) if with_bias else None
    mask = torch.rand(2, 1, 8, 12) < 0.6
    mask[..., :4] &= torch.arange(8)[:, None] < 4  # rows 4..7 see nothing of the first block
    mask[..., 0, 5] = True  # every row sees some key
    mask[..., 4:, 6] = True
    scale = 0.5
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    ba = bias.clone().requires_grad_() if with_bias else None
    s = torch.einsum("bhgqd,bhkd->bhgqk", qa, ka) * scale + (ba if with_bias else 0)
    ref = torch.einsum("bhgqk,bhkd->bhgqd", s.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1), va)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float64)
    blocks = [slice(0, 4), slice(4, 8), slice(8, 12)]
    for b in blocks:
        o_b, lse_b = block_forward(q, k[:, :, b], v[:, :, b], mask[..., b], scale,
                                   bias[..., b] if with_bias else None)
        out, lse = merge(out, lse, o_b, lse_b)
    assert torch.allclose(out, ref, atol=1e-12)
    d_out = torch.randn_like(q)
    ref.backward(d_out)
    delta = (d_out * out).sum(-1)
    dq = torch.zeros_like(q)
    for b in blocks:
        dq_b, dk_b, dv_b, ds = block_backward(q, k[:, :, b], v[:, :, b], d_out, delta, lse, mask[..., b], scale,
                                              bias[..., b] if with_bias else None)
        dq += dq_b
        assert torch.allclose(dk_b, ka.grad[:, :, b], atol=1e-10) and torch.allclose(dv_b, va.grad[:, :, b], atol=1e-10)
        if with_bias:
            assert torch.allclose(ds.sum(0, keepdim=True), ba.grad[..., b], atol=1e-10)
    assert torch.allclose(dq, qa.grad, atol=1e-10)


@pytest.mark.parametrize("context", [1, 2, 4])
def test_ring_skips_only_hidden_chunk_pairs_and_balances_the_work(context):
    """visible_parts under a causal mask: every allowed (query, key) pair lies in a computed sub-block, and each
    rank computes the same 1/2 + 1/(4C) of its C blocks; without a causal mask, whole blocks."""
    seq = 8 * context
    t = seq // context
    full = torch.ones(seq, seq, dtype=torch.bool).tril()
    for r in range(context):
        computed = 0
        for j in range(context):
            pr, pj = global_positions(seq, context, r), global_positions(seq, context, j)
            covered = torch.zeros(t, t, dtype=torch.bool)
            for rows, cols in visible_parts(pr.tolist(), pj.tolist(), causal=True):
                covered[rows, cols] = True
            assert not (full[pr][:, pj] & ~covered).any()
            computed += int(covered.sum())
            assert visible_parts(pr.tolist(), pj.tolist(), causal=False) == [(slice(0, t), slice(0, t))]
        assert computed == (1 / 2 + 1 / (4 * context)) * context * t * t
