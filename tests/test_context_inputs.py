"""Each context rank's share of a micro-batch (`bigtrain.parallel.context.inputs`) and the cores `parallelize`
puts in place, checked in one process: the group's size and rank are given by a stand-in for torch.distributed's
queries, no process group starts."""

from __future__ import annotations

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.models import build_model
from bigtrain.models.documents import document_positions
from bigtrain.parallel.context import core, inputs
from bigtrain.parallel.context.inputs import ContextInputs
from tests.conftest import tiny_overrides


def _inputs(monkeypatch, family: str, size: int, rank: int) -> ContextInputs:
    monkeypatch.setattr(inputs.dist, "get_world_size", lambda group=None: size)
    monkeypatch.setattr(inputs.dist, "get_rank", lambda group=None: rank)
    return ContextInputs(object(), family)


@pytest.mark.parametrize("rank", [0, 1])
def test_causal_batch_with_documents(monkeypatch, rank):
    """C = 2, S = 8: rank 0 holds positions 0 1 6 7, rank 1 2 3 4 5; ids, labels and document ids are cut alike,
    position_ids are the document positions of the whole sequence cut alike, and every rank's tokens carry global
    positions."""
    ids = torch.arange(16).reshape(2, 8)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, -1]])
    batch = {"input_ids": ids, "labels": ids + 100, "document_ids": docs}
    local = _inputs(monkeypatch, "causal", 2, rank).split(batch)
    keep = [0, 1, 6, 7] if rank == 0 else [2, 3, 4, 5]
    assert torch.equal(local["input_ids"], ids[:, keep]) and torch.equal(local["labels"], ids[:, keep] + 100)
    assert torch.equal(local["document_ids"], docs[:, keep])
    assert torch.equal(local["position_ids"], document_positions(docs)[:, keep])


def test_tokens_of_every_rank_and_clear(monkeypatch):
    ctx = _inputs(monkeypatch, "masked", 2, 1)
    mask = torch.tensor([[True] * 6 + [False] * 2])
    local = ctx.split({"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long),
                       "attention_mask": mask})
    assert torch.equal(local["position_ids"], torch.tensor([[2, 3, 4, 5]]))
    tokens = ctx.of("self")
    assert [t.positions.tolist() for t in tokens] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert tokens[0].key_padding.tolist() == [[True, True, False, False]]
    assert ctx.active
    ctx.clear()
    assert not ctx.active


def test_seq2seq_stacks_split_apart(monkeypatch):
    """Encoder and decoder sequences of different lengths, each cut into its own 2C chunks; the decoder's
    positions go to decoder_position_ids."""
    ctx = _inputs(monkeypatch, "seq2seq", 2, 0)
    batch = {"input_ids": torch.arange(8)[None], "attention_mask": torch.ones(1, 8, dtype=torch.bool),
             "decoder_input_ids": torch.arange(4)[None], "decoder_attention_mask": torch.ones(1, 4, dtype=torch.bool),
             "labels": torch.arange(4)[None]}
    local = ctx.split(batch)
    assert local["position_ids"].tolist() == [[0, 1, 6, 7]] and local["decoder_position_ids"].tolist() == [[0, 3]]
    assert local["labels"].tolist() == [[0, 3]]
    assert [t.positions.tolist() for t in ctx.of("encoder")] == [[0, 1, 6, 7], [2, 3, 4, 5]]


def test_unknown_batch_key_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="position_ids"):
        _inputs(monkeypatch, "causal", 2, 0).split({"input_ids": torch.zeros(1, 4), "position_ids": torch.zeros(1, 4)})


def test_cores_replace_every_attention_core_and_run_plain_attention_outside_a_micro_batch(monkeypatch, tmp_path):
    """Every self-attention gets a ring core of its stack, every cross-attention the gathering core (visible in
    print(model)); with no micro-batch split the model computes what it computed before."""
    cfg = load_config(None, tiny_overrides(tmp_path / "run", "seq2seq"))
    torch.manual_seed(0)
    model = build_model(cfg.model, 64, "cpu").eval()
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 4))
    before = model(x, y)
    ctx = _inputs(monkeypatch, "seq2seq", 2, 0)
    core.apply_context_parallel(model, ctx, "ring")
    cores = [m for m in model.modules() if isinstance(m, core.ContextSelfAttention)]
    assert [c.stack for c in cores] == ["encoder"] * cfg.model.n_layers + ["decoder"] * cfg.model.n_layers
    assert sum(isinstance(m, core.ContextCrossAttention) for m in model.modules()) == cfg.model.n_layers
    text = str(model)
    assert "ContextSelfAttention(ring over 2 context ranks, encoder tokens)" in text
    assert "ContextCrossAttention(keys and values gathered over 2 context ranks)" in text
    assert torch.equal(model(x, y), before)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_pipeline_stage_rebuilds_what_split_gives(monkeypatch, rank):
    """`enter` (a pipeline stage, from its S/C hidden tokens and the whole document ids and padding that travel
    with them) sets the same tokens and gives the same positions and shares as `split` of the whole micro-batch."""
    ids = torch.arange(16).reshape(2, 8)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, -1]])
    ctx = _inputs(monkeypatch, "causal", 2, rank)
    local = ctx.split({"input_ids": ids, "labels": ids, "document_ids": docs})
    split_tokens = ctx.of("self")
    view = ctx.enter(4, docs)
    assert torch.equal(view["position_ids"], local["position_ids"])
    assert torch.equal(view["document_ids"], local["document_ids"])
    for a, b in zip(ctx.of("self"), split_tokens, strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.document_ids, b.document_ids)
    masked = _inputs(monkeypatch, "masked", 2, rank)
    mask = torch.tensor([[True] * 6 + [False] * 2])
    local = masked.split({"input_ids": ids[:1], "labels": ids[:1], "attention_mask": mask})
    split_tokens = masked.of("self")
    view = masked.enter(4, key_padding=mask.long())
    assert torch.equal(view["position_ids"], local["position_ids"])
    assert torch.equal(view["attention_mask"], local["attention_mask"])
    assert [t.key_padding.tolist() for t in masked.of("self")] == [t.key_padding.tolist() for t in split_tokens]


def test_recompute_runs_with_the_tokens_of_its_forward(monkeypatch):
    """Under a pipeline schedule a later micro-batch's forward sets its tokens before an earlier one's backward:
    a checkpointed piece recomputes with the tokens its forward saw, and the current ones are put back after."""
    from torch import nn

    from bigtrain.parallel.activation_checkpointing import ActivationCheckpoint

    ctx = _inputs(monkeypatch, "causal", 2, 0)

    class Reads(nn.Module):
        """y = x² · (first token's global position + 1), reading the tokens when it runs."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Identity()
            self.seen: list[int] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            factor = int(ctx.of("self")[0].positions[0]) + 1
            self.seen.append(factor)
            return self.inner(x) * x * factor

    reads = Reads()
    piece = ActivationCheckpoint(reads, ctx)
    x = torch.ones(3, requires_grad=True)
    ctx.tokens = {"self": [inputs.Tokens(torch.tensor([4, 5]))]}  # micro-batch 0
    y = piece(x).sum()
    later = {"self": [inputs.Tokens(torch.tensor([9, 9]))]}  # micro-batch 1's forward comes first
    ctx.tokens = later
    y.backward()
    assert reads.seen == [5, 5] and torch.equal(x.grad, torch.full((3,), 10.0))
    assert ctx.tokens is later
