"""Attention's one Q/K/V projection (`bigtrain/models/qkv.py`): its row layout, its initialization (the values
the three separate linears of earlier bigtrains had), tensor-parallel chunks, and state dicts / checkpoint readers
of the three-parameter form read into it."""

from __future__ import annotations

import pytest
import torch

from bigtrain.checkpoint.joined_qkv import JoinedQKVReader, joined_state
from bigtrain.checkpoint.weights import TensorReader
from bigtrain.config import ModelConfig
from bigtrain.models import build_model
from bigtrain.models.init import parameter_generator
from bigtrain.models.qkv import join_qkv, qkv_layout, split_qkv, split_state

VOCAB = 40


def _cfg(n_kv_heads: int | None, **kw: object) -> ModelConfig:
    return ModelConfig(d_model=32, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64, n_layers=2, max_seq_len=16,
                       dropout=0.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_rows_are_blocked_by_key_value_head(n_kv_heads):
    """Block g = [Q heads of g; K head g; V head g]; split undoes join; a T-way chunk of the rows is the join of
    the T-way chunks of Q, K and V (what tensor parallelism cuts)."""
    head_dim, groups = qkv_layout(_cfg(n_kv_heads))
    kv = 4 // groups
    q, k, v = torch.randn(4 * head_dim, 3), torch.randn(kv * head_dim, 3), torch.randn(kv * head_dim, 3)
    joined = join_qkv(q, k, v, head_dim, groups)
    block = (groups + 2) * head_dim
    assert torch.equal(joined[:groups * head_dim], q[:groups * head_dim])
    assert torch.equal(joined[groups * head_dim:(groups + 1) * head_dim], k[:head_dim])
    assert torch.equal(joined[block - head_dim:block], v[:head_dim])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(joined, head_dim, groups), (q, k, v), strict=True))
    for tp in (t for t in (1, 2, 4) if kv % t == 0):
        for r in range(tp):
            local = join_qkv(q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r], head_dim, groups)
            assert torch.equal(joined.chunk(tp)[r], local)


@pytest.mark.parametrize("init", ["normal", "xavier"])
def test_initialization_draws_each_part_as_its_own_linear(init):
    """Q, K and V hold exactly what `q_proj`, `k_proj`, `v_proj` were initialized to (their own generators)."""
    cfg = _cfg(2, init=init)
    model = build_model(cfg, VOCAB, "cpu", seed=3)
    head_dim, groups = qkv_layout(cfg)
    attn = model.blocks[1].self_attn
    for part, got in zip(("q_proj", "k_proj", "v_proj"), split_qkv(attn.qkv_proj.weight.detach(), head_dim, groups),
                         strict=True):
        expected = torch.empty(got.shape)
        gen = parameter_generator(3, f"blocks.1.self_attn.{part}.weight")
        if init == "xavier":
            torch.nn.init.xavier_uniform_(expected, generator=gen)
        else:
            expected.normal_(0.0, cfg.init_std, generator=gen)
        assert torch.equal(got, expected), part


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_a_three_parameter_state_dict_loads_and_reads_joined(family):
    """A state dict with q_proj / k_proj / v_proj (earlier bigtrains) loads into the model with the same logits,
    and a reader of it serves the joined tensors, whole or as a tensor-parallel box."""
    cfg = _cfg(2, family=family)
    model = build_model(cfg, VOCAB, "cpu", seed=1).eval()
    old = split_state(model.state_dict(), *qkv_layout(cfg))
    assert any(n.endswith("self_attn.k_proj.weight") for n in old) and not any("qkv_proj" in n for n in old)
    if family == "seq2seq":
        assert "decoder_blocks.0.cross_attn.v_proj.bias" in old
    fresh = build_model(cfg, VOCAB, "cpu", seed=2).eval()
    fresh.load_state_dict(old)
    ids = torch.randint(0, VOCAB, (2, 8))
    inputs = {"input_ids": ids} if family == "causal" else {"input_ids": ids, "decoder_input_ids": ids}
    with torch.no_grad():
        assert torch.equal(model(**inputs), fresh(**inputs))
    assert joined_state(old, cfg).keys() == model.state_dict().keys()
    reader = JoinedQKVReader(TensorReader(None, {k: tuple(v.shape) for k, v in old.items()}, old.__getitem__), cfg)
    for name, p in model.named_parameters():
        assert reader.shape(name) == tuple(p.shape) and reader.has(name, "param")
        assert torch.equal(reader.read(name, "param"), p.detach())
    name = next(n for n in old if n.endswith("self_attn.q_proj.weight")).replace("q_proj", "qkv_proj")
    rows = reader.shape(name)[0] // 2
    box = ((rows, 2 * rows), (0, 32))
    assert torch.equal(reader.read(name, "param", box), model.state_dict()[name][rows:])
    assert torch.equal(reader.read_flat(name, "param", box, 5, 40), model.state_dict()[name][rows:].reshape(-1)[5:40])
