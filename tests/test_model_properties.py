"""Properties of the three model families: causality, padding invariance, bidirectionality, rotary's
relative-position property, and the seeded initialization / meta-device build."""

from __future__ import annotations

import math

import pytest
import torch

from bigtrain.config import ModelConfig
from bigtrain.models import CausalLM, MaskedLM, Seq2SeqLM, TransformerLM, build_model, count_parameters
from bigtrain.models.layers import Rotary, sinusoidal_table
from bigtrain.models.qkv import split_qkv

V, D, H, FF, MAX_LEN = 37, 32, 4, 64, 32


def _cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(d_model=D, n_heads=H, d_ff=FF, n_layers=2, max_seq_len=MAX_LEN, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _model(seed: int = 0, **kw: object) -> TransformerLM:
    model = build_model(_cfg(**kw), V, "cpu", seed=seed).eval()
    # larger-than-default weights make every interaction visible in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed" not in name and "head" not in name:
                p.mul_(10.0)
    return model


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def _real(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


OPTION_SETS: list[dict[str, object]] = [
    dict(),  # Vaswani et al. 2017: post-norm, ReLU, sinusoidal, LayerNorm, tied
    dict(positions="learned", norm_position="pre", activation="gelu", tie_embeddings=False),
    dict(positions="rotary", norm_position="pre", activation="swiglu", norm="rmsnorm", bias=False, n_kv_heads=2),
    dict(positions="none", norm_position="post", activation="relu", n_kv_heads=2, scale_embeddings=False),
    dict(positions="rotary", norm_position="post", activation="gelu", norm="rmsnorm", tie_embeddings=False),
    dict(positions="sinusoidal", norm_position="pre", activation="swiglu", n_kv_heads=1, init="xavier"),
]
OPTION_IDS = [",".join(f"{k}={v}" for k, v in o.items()) or "guide" for o in OPTION_SETS]


# --- 4. causality ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts", OPTION_SETS, ids=OPTION_IDS)
@pytest.mark.parametrize("with_mask", [False, True])
@torch.no_grad()
def test_causal_lm_future_tokens_do_not_change_past_logits(opts: dict[str, object], with_mask: bool) -> None:
    model = _model(**opts)
    assert isinstance(model, CausalLM)
    ids = _ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool) if with_mask else None
    base = model(ids, attention_mask=mask)
    for t in (1, 6, 11):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(12 - t)) % V
        out = model(changed, attention_mask=mask)
        assert (out[:, :t] - base[:, :t]).abs().max().item() <= 1e-6, t
        assert (out[:, t] - base[:, t]).abs().max().item() > 1e-3, t  # the changed position itself does move


@pytest.mark.parametrize("opts", OPTION_SETS[:3], ids=OPTION_IDS[:3])
@torch.no_grad()
def test_seq2seq_decoder_is_causal(opts: dict[str, object]) -> None:
    model = _model(family="seq2seq", n_decoder_layers=3, **opts)
    assert isinstance(model, Seq2SeqLM)
    src, tgt = _ids(2, 9, seed=1), _ids(2, 10, seed=2)
    src_mask = _real([9, 6], 9)
    base = model(src, tgt, attention_mask=src_mask)
    for t in (1, 5, 9):
        changed = tgt.clone()
        changed[:, t:] = (changed[:, t:] + 3) % V
        out = model(src, changed, attention_mask=src_mask)
        assert (out[:, :t] - base[:, :t]).abs().max().item() <= 1e-6, t
        out_masked = model(src, changed, attention_mask=src_mask, decoder_attention_mask=torch.ones_like(tgt).bool())
        assert (out_masked[:, :t] - base[:, :t]).abs().max().item() <= 1e-6, t
    # ...while every decoder position does depend on the (real) source tokens
    src2 = src.clone()
    src2[:, 0] = (src2[:, 0] + 1) % V
    assert ((model(src2, tgt, attention_mask=src_mask)[:, 0] - base[:, 0]).abs().amax(-1) > 1e-4).all()


# --- 9. masked LM is bidirectional ------------------------------------------------------------------------


@pytest.mark.parametrize("opts", OPTION_SETS[:3], ids=OPTION_IDS[:3])
@torch.no_grad()
def test_masked_lm_sees_later_tokens(opts: dict[str, object]) -> None:
    model = _model(family="masked", **opts)
    assert isinstance(model, MaskedLM)
    ids = _ids(2, 10, seed=3)
    base = model(ids)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    out = model(changed)
    assert ((out[:, 0] - base[:, 0]).abs().amax(-1) > 1e-4).all()
    assert ((out[:, :-1] - base[:, :-1]).abs().amax(-1) > 1e-4).all()


# --- 5. padding invariance --------------------------------------------------------------------------------


def _pad(seqs: list[torch.Tensor], total: int, fill_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to `total` with random junk ids (not one pad id): returns (ids, real-token mask)."""
    junk = _ids(len(seqs), total, seed=fill_seed)
    ids = junk.clone()
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids, _real([len(s) for s in seqs], total)


PAD_OPTION_SETS = OPTION_SETS[:4]
PAD_IDS = OPTION_IDS[:4]


@pytest.mark.parametrize("family", ["causal", "masked"])
@pytest.mark.parametrize("opts", PAD_OPTION_SETS, ids=PAD_IDS)
@torch.no_grad()
def test_single_stack_padding_invariance(family: str, opts: dict[str, object]) -> None:
    model = _model(family=family, **opts)
    seqs = [_ids(1, n, seed=10 + n)[0] for n in (7, 4, 11, 1)]
    alone = [model(s[None])[0] for s in seqs]
    for fill_seed in (20, 21):
        ids, real = _pad(seqs, 12, fill_seed)
        out = model(ids, attention_mask=real)
        assert torch.isfinite(out).all()
        for i, s in enumerate(seqs):
            assert (out[i, :len(s)] - alone[i]).abs().max().item() <= 1e-5, (i, fill_seed)


@pytest.mark.parametrize("opts", PAD_OPTION_SETS, ids=PAD_IDS)
@pytest.mark.parametrize("tgt_total", [8, 10])  # 10 == source total: padded keys share query indices
@torch.no_grad()
def test_seq2seq_padding_invariance(opts: dict[str, object], tgt_total: int) -> None:
    model = _model(family="seq2seq", **opts)
    srcs = [_ids(1, n, seed=30 + n)[0] for n in (10, 3, 6)]
    tgts = [_ids(1, n, seed=40 + n)[0] for n in (5, 8, 2)]
    alone = [model(s[None], t[None])[0] for s, t in zip(srcs, tgts, strict=True)]
    for fill_seed in (50, 51):
        src, src_real = _pad(srcs, 10, fill_seed)
        tgt, tgt_real = _pad(tgts, tgt_total, fill_seed + 10)
        out = model(src, tgt, attention_mask=src_real, decoder_attention_mask=tgt_real)
        assert torch.isfinite(out).all()
        for i, t in enumerate(tgts):
            assert (out[i, :len(t)] - alone[i]).abs().max().item() <= 1e-5, (i, fill_seed)
        # encoder padding alone (decoder unpadded, all lengths equal to tgt_total)
        full_tgt = _ids(3, tgt_total, seed=fill_seed + 20)
        out_enc = model(src, full_tgt, attention_mask=src_real)
        for i, s in enumerate(srcs):
            ref = model(s[None], full_tgt[i:i + 1])[0]
            assert (out_enc[i] - ref).abs().max().item() <= 1e-5, (i, fill_seed)


# --- 7. rotary --------------------------------------------------------------------------------------------


def test_rotary_depends_only_on_relative_position() -> None:
    rot = Rotary(head_dim=16, max_seq_len=128)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, 1, 16, generator=gen)

    def dot(m: int, n: int) -> float:
        return (rot(q, torch.tensor([[m]])) * rot(k, torch.tensor([[n]]))).sum().item()

    for m, n in [(0, 0), (3, 1), (1, 3), (10, 25), (40, 7)]:
        for shift in (1, 5, 60):
            assert abs(dot(m, n) - dot(m + shift, n + shift)) <= 1e-5, (m, n, shift)
    assert abs(dot(0, 5) - dot(5, 0)) > 1e-3  # ... and does depend on the (signed) difference
    # position 0 is the identity; rotation preserves the norm; position_ids == position within a sequence
    assert torch.allclose(rot(q, torch.tensor([[0]])), q)
    x = torch.randn(2, 3, 20, 16, generator=gen)
    y = rot(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(rot(x[:, :, 7:9], torch.tensor([[7, 8]]).expand(2, 2)), y[:, :, 7:9], atol=1e-6)


def test_rotary_pairs_rotate_by_position_times_frequency() -> None:
    d, theta = 8, 10000.0
    rot = Rotary(head_dim=d, max_seq_len=16, theta=theta)
    x = torch.randn(1, 1, 16, d, generator=torch.Generator().manual_seed(1))
    y = rot(x)
    for pos in (0, 3, 15):
        for i in range(d // 2):
            a = pos * theta ** (-2 * i / d)
            x1, x2 = x[0, 0, pos, i].item(), x[0, 0, pos, i + d // 2].item()
            assert abs(y[0, 0, pos, i].item() - (x1 * math.cos(a) - x2 * math.sin(a))) <= 1e-5
            assert abs(y[0, 0, pos, i + d // 2].item() - (x2 * math.cos(a) + x1 * math.sin(a))) <= 1e-5


# --- 8. initialization and the meta-device build ----------------------------------------------------------


def _weights(model: TransformerLM, suffix: str) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith(suffix)])


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_normal_init_std(family: str) -> None:
    cfg = _cfg(family=family, d_model=64, d_ff=256, n_layers=3, init_std=0.02)
    model = build_model(cfg, 500, "cpu", seed=0)
    n_blocks = 6 if family == "seq2seq" else 3
    q = _weights(model, "qkv_proj.weight")
    assert abs(q.mean().item()) < 1e-3
    assert q.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * n_blocks)
    assert _weights(model, "o_proj.weight").std().item() == pytest.approx(residual, rel=0.05)
    assert _weights(model, "ffn.down.weight").std().item() == pytest.approx(residual, rel=0.05)
    assert _weights(model, "ffn.up.weight").std().item() == pytest.approx(0.02, rel=0.05)
    assert model.embed.tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert (_weights(model, ".bias") == 0).all()
    for name, module in model.named_modules():
        if name.endswith("norm") and hasattr(module, "weight"):
            assert (module.weight == 1).all(), name


def test_xavier_init_bounds() -> None:
    """Each linear within its xavier bound; Q, K and V each within their own (drawn as three linears)."""
    cfg = _cfg(d_model=64, d_ff=256, n_layers=2, init="xavier", n_kv_heads=2)
    model = build_model(cfg, 500, "cpu", seed=0)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "head":
            weights = [module.weight]
            if name.endswith("qkv_proj"):
                attn = model.get_submodule(name.rsplit(".", 1)[0])
                weights = split_qkv(module.weight, attn.head_dim, attn.groups)
            for weight in weights:
                fan_out, fan_in = weight.shape
                bound = math.sqrt(6 / (fan_in + fan_out))
                w = weight.abs().max().item()
                assert bound * 0.9 < w <= bound, name
    assert model.embed.tokens.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.05)


def test_init_is_deterministic_by_seed() -> None:
    cfg = _cfg(positions="learned", tie_embeddings=False)
    a, b, c = (build_model(cfg, V, "cpu", seed=s).state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        if key.endswith("weight") and "norm" not in key:
            assert not torch.equal(a[key], c[key]), key


@pytest.mark.parametrize("family", ["causal", "masked", "seq2seq"])
def test_tied_head_shares_storage(family: str) -> None:
    tied = build_model(_cfg(family=family), V, "cpu", seed=0)
    assert tied.head.weight is tied.embed.tokens.weight
    assert tied.head.weight.data_ptr() == tied.embed.tokens.weight.data_ptr()
    untied = build_model(_cfg(family=family, tie_embeddings=False), V, "cpu", seed=0)
    assert untied.head.weight.data_ptr() != untied.embed.tokens.weight.data_ptr()
    assert count_parameters(untied) - count_parameters(tied) == V * D
    with torch.no_grad():  # an update through one name is seen through the other
        tied.embed.tokens.weight[0, 0] = 123.0
    assert tied.head.weight[0, 0].item() == 123.0


@pytest.mark.parametrize("family", ["causal", "masked", "seq2seq"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rotary"])
def test_meta_build_allocates_nothing(family: str, positions: str) -> None:
    cfg = _cfg(family=family, positions=positions, n_kv_heads=2)
    meta = build_model(cfg, V, "meta")
    assert all(p.is_meta for p in meta.parameters())
    real = build_model(cfg, V, "cpu", seed=0)
    assert not any(p.is_meta for p in real.parameters())
    assert not any(b.is_meta for b in real.buffers())
    assert count_parameters(meta) == count_parameters(real) > 0
    assert count_parameters(meta, exclude_embeddings=True) == count_parameters(real, exclude_embeddings=True)
    # the non-persistent buffers were recomputed after leaving the meta device, not left as garbage
    if positions == "sinusoidal":
        assert torch.equal(real.embed.table, sinusoidal_table(MAX_LEN, D))
    if positions == "rotary":
        fresh = Rotary(D // H, MAX_LEN)
        for module in real.modules():
            if isinstance(module, Rotary):
                assert torch.equal(module.cos, fresh.cos) and torch.equal(module.sin, fresh.sin)


def test_count_parameters_by_hand() -> None:
    cfg = _cfg(n_layers=1, tie_embeddings=True)
    model = build_model(cfg, V, "meta")
    attn = 4 * (D * D + D)
    ffn = (D * FF + FF) + (FF * D + D)
    norms = 2 * (2 * D)
    assert count_parameters(model) == V * D + attn + ffn + norms
    assert count_parameters(model, exclude_embeddings=True) == attn + ffn + norms


def test_attention_maps_match_the_fused_path():
    """The weights path returns softmax rows that sum to 1, respect causality, and give the same logits."""
    from bigtrain.config import load_config
    from bigtrain.models import build_model
    from bigtrain.models.inspect import attention_maps

    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_layers=2",
                             "model.max_seq_len=16", "data.seq_len=16", "model.dropout=0.0"])
    model = build_model(cfg.model, 64, "cpu", seed=0).eval()
    ids = torch.randint(0, 64, (2, 10))
    fused = model(ids)
    with attention_maps(model) as maps:
        explicit = model(ids)
    assert sorted(maps) == ["blocks.0.self_attn", "blocks.1.self_attn"]
    assert (fused - explicit).abs().max() <= 1e-5
    weights = maps["blocks.1.self_attn"]
    assert weights.shape == (2, 4, 10, 10)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 10), atol=1e-6)
    assert weights.triu(1).abs().max() == 0  # no weight on future positions
    assert all(not m.record_weights and m.weights is None for m in model.modules() if hasattr(m, "record_weights"))
