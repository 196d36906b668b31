"""The model's pieces against independent references: torch.nn.Transformer layers given the same weights,
Vaswani et al. 2017's formulas written out element-wise, and attention computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.config import ModelConfig, load_config
from bigtrain.models import build_model
from bigtrain.models.attention import Attention, attention_core, build_mask
from bigtrain.models.blocks import Block
from bigtrain.models.layers import RMSNorm, sinusoidal_table
from bigtrain.models.qkv import split_qkv

D, H, FF = 32, 4, 64


def _cfg(**kw: object) -> ModelConfig:
    """Vaswani et al. 2017's options: post-norm, ReLU, sinusoidal, scaled embeddings, biases, LayerNorm, no dropout."""
    base: dict[str, object] = dict(d_model=D, n_heads=H, d_ff=FF, n_layers=2, max_seq_len=32, dropout=0.0,
                                   norm_position="post", activation="relu", positions="sinusoidal",
                                   scale_embeddings=True, bias=True, norm="layernorm")
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


@torch.no_grad()
def _randomize_norms(module: nn.Module, gen: torch.Generator) -> None:
    """Norm weights/biases away from 1/0 so that a mix-up between norms would be caught."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm | RMSNorm):
            m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=gen))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


@torch.no_grad()
def _copy_attention(ours: Attention, theirs: nn.MultiheadAttention) -> None:
    theirs.in_proj_weight.copy_(torch.cat(split_qkv(ours.qkv_proj.weight, ours.head_dim, ours.groups)))
    theirs.in_proj_bias.copy_(torch.cat(split_qkv(ours.qkv_proj.bias, ours.head_dim, ours.groups)))
    theirs.out_proj.weight.copy_(ours.o_proj.weight)
    theirs.out_proj.bias.copy_(ours.o_proj.bias)


@torch.no_grad()
def _copy_common(block: Block, ref: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> None:
    _copy_attention(block.self_attn, ref.self_attn)
    ref.linear1.load_state_dict(block.ffn.up.state_dict())
    ref.linear2.load_state_dict(block.ffn.down.state_dict())
    ref.norm1.load_state_dict(block.self_attn_norm.state_dict())


def _padding(lengths: list[int], total: int) -> torch.Tensor:
    """bool [B, total], True at real tokens (ours); torch's convention is the negation."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


# --- 1. encoder block == nn.TransformerEncoderLayer --------------------------------------------------------


def _encoder_pair(norm_position: str, activation: str) -> tuple[Block, nn.TransformerEncoderLayer]:
    torch.manual_seed(0)
    block = Block(_cfg(norm_position=norm_position, activation=activation), causal=False, cross_attention=False)
    _randomize_norms(block, torch.Generator().manual_seed(1))
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation=activation, batch_first=True,
                                     norm_first=norm_position == "pre")
    _copy_common(block, ref)
    ref.norm2.load_state_dict(block.ffn_norm.state_dict())
    return block.eval(), ref.eval()


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_position", ["post", "pre"])
@torch.no_grad()
def test_encoder_block_matches_torch(norm_position: str, activation: str) -> None:
    block, ref = _encoder_pair(norm_position, activation)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(2))
    assert (block(x) - ref(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@torch.no_grad()
def test_encoder_block_matches_torch_with_padding(norm_position: str) -> None:
    block, ref = _encoder_pair(norm_position, "relu")
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(3))
    real = _padding([7, 4, 2], 7)
    ours = block(x, padding_mask=real)
    theirs = ref(x, src_key_padding_mask=~real)
    assert torch.isfinite(ours).all()
    assert (ours - theirs)[real].abs().max().item() <= 1e-5


# --- 2. decoder block == nn.TransformerDecoderLayer --------------------------------------------------------


def _decoder_pair(norm_position: str) -> tuple[Block, nn.TransformerDecoderLayer]:
    torch.manual_seed(0)
    block = Block(_cfg(norm_position=norm_position), causal=True, cross_attention=True)
    _randomize_norms(block, torch.Generator().manual_seed(1))
    ref = nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, activation="relu", batch_first=True,
                                     norm_first=norm_position == "pre")
    _copy_common(block, ref)
    assert block.cross_attn is not None and block.cross_attn_norm is not None
    _copy_attention(block.cross_attn, ref.multihead_attn)
    ref.norm2.load_state_dict(block.cross_attn_norm.state_dict())
    ref.norm3.load_state_dict(block.ffn_norm.state_dict())
    return block.eval(), ref.eval()


def _float_mask(pad: torch.Tensor) -> torch.Tensor:
    """torch-style additive key padding mask (True = PAD -> -inf), float to match a float tgt_mask."""
    return torch.zeros(pad.shape).masked_fill(pad, float("-inf"))


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@torch.no_grad()
def test_decoder_block_matches_torch(norm_position: str) -> None:
    block, ref = _decoder_pair(norm_position)
    gen = torch.Generator().manual_seed(4)
    y, memory = torch.randn(2, 6, D, generator=gen), torch.randn(2, 9, D, generator=gen)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    ours = block(y, memory=memory)
    theirs = ref(y, memory, tgt_mask=causal, tgt_is_causal=True)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("memory_len", [9, 6])  # 6 == target length: a padded key shares the query's index
@pytest.mark.parametrize("norm_position", ["post", "pre"])
@torch.no_grad()
def test_decoder_block_matches_torch_with_memory_padding(norm_position: str, memory_len: int) -> None:
    block, ref = _decoder_pair(norm_position)
    gen = torch.Generator().manual_seed(5)
    y, memory = torch.randn(3, 6, D, generator=gen), torch.randn(3, memory_len, D, generator=gen)
    mem_real = _padding([memory_len, 3, 1], memory_len)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    ours = block(y, memory=memory, memory_padding_mask=mem_real)
    theirs = ref(y, memory, tgt_mask=causal, memory_key_padding_mask=_float_mask(~mem_real))
    assert (ours - theirs).abs().max().item() <= 1e-5


@torch.no_grad()
def test_decoder_block_matches_torch_with_target_and_memory_padding() -> None:
    block, ref = _decoder_pair("post")
    gen = torch.Generator().manual_seed(6)
    y, memory = torch.randn(3, 6, D, generator=gen), torch.randn(3, 5, D, generator=gen)
    tgt_real, mem_real = _padding([6, 4, 2], 6), _padding([2, 5, 3], 5)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    ours = block(y, padding_mask=tgt_real, memory=memory, memory_padding_mask=mem_real)
    theirs = ref(y, memory, tgt_mask=causal, tgt_key_padding_mask=_float_mask(~tgt_real),
                 memory_key_padding_mask=_float_mask(~mem_real))
    assert torch.isfinite(ours).all()
    assert (ours - theirs)[tgt_real].abs().max().item() <= 1e-5


# --- 3. sinusoidal table and embedding ---------------------------------------------------------------------


@pytest.mark.parametrize(("seq_len", "d_model"), [(16, 32), (24, 8)])
def test_sinusoidal_table_matches_formula(seq_len: int, d_model: int) -> None:
    table = sinusoidal_table(seq_len, d_model)
    assert table.shape == (seq_len, d_model)
    for pos in range(seq_len):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert abs(table[pos, 2 * i].item() - math.sin(angle)) <= 1e-6, (pos, 2 * i)
            assert abs(table[pos, 2 * i + 1].item() - math.cos(angle)) <= 1e-6, (pos, 2 * i + 1)


@torch.no_grad()
def test_embedding_is_scaled_tokens_plus_sinusoid() -> None:
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_layers=1",
                             "model.max_seq_len=32", "data.seq_len=32", "model.dropout=0.0"])
    model = build_model(cfg.model, 40, "cpu", seed=0).eval()
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    table = sinusoidal_table(32, 32)
    expected = model.embed.tokens.weight[ids] * math.sqrt(32) + table[:10]
    assert (model.embed(ids) - expected).abs().max().item() <= 1e-5
    shifted = model.embed.tokens.weight[ids] * math.sqrt(32) + table[5:15]
    assert (model.embed(ids, torch.arange(5, 15)[None, :].expand(2, 10)) - shifted).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="max_seq_len"):
        model.embed(torch.zeros(1, 33, dtype=torch.long))


# --- 6. attention by hand, GQA ----------------------------------------------------------------------------


def _manual_attention(attn: Attention, x: torch.Tensor, n_heads: int, n_kv_heads: int,
                      allowed: torch.Tensor | None) -> torch.Tensor:
    """Per-head loop: query head h reads key/value head h // (n_heads / n_kv_heads). allowed: [B, T, S]."""
    batch, seq, _ = x.shape
    hd = attn.head_dim
    (wq, wk, wv), (bq, bk, bv) = (split_qkv(t, hd, attn.groups) for t in (attn.qkv_proj.weight, attn.qkv_proj.bias))
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    groups = n_heads // n_kv_heads
    heads = []
    for h in range(n_heads):
        g = h // groups
        qh, kh, vh = q[..., h * hd:(h + 1) * hd], k[..., g * hd:(g + 1) * hd], v[..., g * hd:(g + 1) * hd]
        scores = qh @ kh.transpose(-2, -1) / math.sqrt(hd)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ vh)
    return torch.cat(heads, dim=-1) @ attn.o_proj.weight.T + attn.o_proj.bias


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("record_weights", [False, True])
@torch.no_grad()
def test_attention_matches_manual(n_kv_heads: int, causal: bool, padded: bool, record_weights: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(D, H, n_kv_heads, bias=True, dropout=0.0, causal=causal).eval()
    for p in attn.parameters():  # non-zero biases too
        p.copy_(torch.randn_like(p) * 0.2)
    attn.record_weights = record_weights
    x = torch.randn(2, 6, D)
    real = _padding([6, 4], 6) if padded else None
    allowed = torch.ones(2, 6, 6, dtype=torch.bool)
    if padded:
        allowed &= real[:, None, :]
    if causal:
        allowed &= torch.ones(6, 6, dtype=torch.bool).tril()
    ours = attn(x, key_padding=real)
    ref = _manual_attention(attn, x, H, n_kv_heads, allowed)
    rows = real if padded else torch.ones(2, 6, dtype=torch.bool)
    assert (ours - ref)[rows].abs().max().item() <= 1e-5
    assert (attn.weights is not None) == record_weights


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_core_paths_agree(n_kv_heads: int, causal: bool, padded: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k, v = torch.randn(2, n_kv_heads, 5, 8, generator=gen), torch.randn(2, n_kv_heads, 5, 8, generator=gen)
    real = _padding([5, 3], 5) if padded else None
    mask = build_mask(5, real, causal, q.device)
    fast, none = attention_core(q, k, v, mask, causal, 0.0, return_weights=False)
    slow, weights = attention_core(q, k, v, mask, causal, 0.0, return_weights=True)
    assert none is None and weights is not None
    assert (fast - slow).abs().max().item() <= 1e-5
    assert weights.shape == (2, 4, 5, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 5), atol=1e-6)
    # by hand, K/V heads repeated: query head h uses key/value head h // (4 / n_kv_heads)
    groups = 4 // n_kv_heads
    k_rep, v_rep = k[:, [h // groups for h in range(4)]], v[:, [h // groups for h in range(4)]]
    scores = q @ k_rep.transpose(-2, -1) / math.sqrt(8)
    effective = torch.ones(2, 1, 5, 5, dtype=torch.bool) if mask is None else mask.expand(2, 1, 5, 5)
    if causal:
        effective = effective & torch.ones(5, 5, dtype=torch.bool).tril()
        assert (weights.masked_select(~torch.ones(5, 5, dtype=torch.bool).tril()) == 0).all()
    hand = scores.masked_fill(~effective, float("-inf")).softmax(-1)
    assert (weights - hand).abs().max().item() <= 1e-6
    assert (slow - hand @ v_rep).abs().max().item() <= 1e-5
    assert (weights.masked_select(~effective.expand_as(weights)) == 0).all()
    if padded:  # padded keys get no weight from real queries
        assert (weights[1, :, :3, 3:] == 0).all()


def test_cross_attention_mask_never_lets_a_query_see_a_padded_key() -> None:
    """Regression: with equal query/key lengths, only self-attention adds the diagonal."""
    real = _padding([2], 3)
    self_mask = build_mask(3, real, False, torch.device("cpu"))
    cross_mask = build_mask(3, real, False, torch.device("cpu"), self_attention=False)
    assert self_mask is not None and cross_mask is not None
    assert self_mask[0, 0, 2, 2]  # a padded query may see itself in self-attention (no NaN rows)
    assert not cross_mask[0, 0, :, 2].any()


# --- 10. RMSNorm ------------------------------------------------------------------------------------------


@torch.no_grad()
def test_rmsnorm_matches_formula_and_torch() -> None:
    gen = torch.Generator().manual_seed(8)
    norm = RMSNorm(D, eps=1e-5)
    norm.weight.copy_(torch.randn(D, generator=gen))
    x = torch.randn(3, 5, D, generator=gen) * 3
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert (norm(x) - expected).abs().max().item() <= 1e-5
    # element-wise for one row, in Python floats
    row = x[0, 0].tolist()
    rms = math.sqrt(sum(v * v for v in row) / D + 1e-5)
    for j in range(D):
        assert abs(norm(x)[0, 0, j].item() - row[j] / rms * norm.weight[j].item()) <= 1e-5
    if hasattr(nn, "RMSNorm"):
        ref = nn.RMSNorm(D, eps=1e-5)
        ref.weight.copy_(norm.weight)
        assert (norm(x) - ref(x)).abs().max().item() <= 1e-5
    assert (F.layer_norm(x, (D,)) - nn.LayerNorm(D)(x)).abs().max().item() <= 1e-6  # LayerNorm sanity
