"""Document masking (`data.document_masking`, causal family): a packed block of several documents computes what
each document computes alone.

Module level: logits and gradients of a packed block with document ids against each document run alone
(learned, sinusoidal, rotary, relative and no positions; multi-head and grouped-query attention); the
pipeline's layer sequence carries the document ids; tensor parallelism with and without sequence parallelism
(2 ranks). Data level: the document ids of packed blocks change exactly after each end-of-document token, and
a short training run takes them through the trainer. Config level: the families that do not pack are refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.config import load_config
from bigtrain.data import ByteTokenizer, build_datasets
from bigtrain.data.collate import collate
from bigtrain.data.corpus import load_corpus
from bigtrain.distributed.rendezvous import free_port
from bigtrain.errors import ConfigError
from bigtrain.models import build_model
from bigtrain.models.documents import document_positions
from bigtrain.models.loss import cross_entropy_sum, model_inputs
from tests.conftest import (
    REPO,
    assert_same_curve,
    launch_ok,
    single_process,
    tiny_config,
    tiny_overrides,
)

VOCAB, TOL = 64, 1e-5
MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.dropout=0.0",
         "model.max_seq_len=64", f"model.vocab_size={VOCAB}", "data.seq_len=32"]
# Document lengths of the two rows of the packed batch (each row is one block of 32 tokens).
LENGTHS = [[5, 9, 1, 7, 10], [12, 20]]
POSITIONS = {"learned": ["model.positions=learned"], "sinusoidal": ["model.positions=sinusoidal"],
             "rotary": ["model.positions=rotary"], "none": ["model.positions=none"],
             "relative": ["model.positions=relative", "model.relative_buckets=8", "model.relative_max_distance=16"]}
HEADS = {"mha": [], "gqa": ["model.n_kv_heads=2", "model.norm_position=pre", "model.norm=rmsnorm",
                            "model.activation=swiglu", "model.tie_embeddings=false"]}


def model_for(*overrides: str):
    return build_model(load_config(None, [*MODEL, *overrides]).model, VOCAB, "cpu", seed=3)


def packed_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in LENGTHS])
    return {"input_ids": torch.randint(0, VOCAB, docs.shape, generator=gen),
            "labels": torch.randint(0, VOCAB, docs.shape, generator=gen), "document_ids": docs}


def documents(batch: dict[str, torch.Tensor]):
    """(row, start, end) of every document of the packed batch."""
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            yield row, start, start + n
            start += n


def grad_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over parameters of max |got - want| / max |want|. Key-projection biases have an exactly zero true
    gradient (softmax ignores a shift common to all keys), so each is measured against at least 1e-3 of the
    largest gradient entry."""
    floor = 1e-3 * max(float(g.abs().max()) for g in want.values())
    return max(float((got[n] - g).abs().max()) / max(floor, float(g.abs().max())) for n, g in want.items())


# --- model ------------------------------------------------------------------------------------------------

def test_positions_restart_per_document() -> None:
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3, 3, 3], [0] * 10])
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 2, 3], list(range(10))]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_packed_logits_and_gradients_equal_each_document_alone(positions, heads) -> None:
    """Logits of the packed block = each document's logits alone; the gradient of the packed block's summed loss
    = the gradient of the sum over documents of their losses alone (the same labels, the one at each
    document's last token included)."""
    model = model_for(*POSITIONS[positions], *HEADS[heads])
    batch = packed_batch()
    packed = model(**model_inputs(batch))
    cross_entropy_sum(packed, batch["labels"]).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits_diff, alone_loss = 0.0, torch.zeros(())
    for row, start, end in documents(batch):
        alone = model(batch["input_ids"][row:row + 1, start:end])[0]
        logits_diff = max(logits_diff, float((alone - packed[row, start:end]).detach().abs().max()))
        alone_loss = alone_loss + cross_entropy_sum(alone, batch["labels"][row, start:end])
    alone_loss.backward()
    grads = grad_diff(packed_grads, {n: p.grad for n, p in model.named_parameters()})
    print(f"\nmeasured {positions}/{heads}: max |logit difference| {logits_diff:.1e}, max gradient difference "
          f"{grads:.1e} (of the parameter's largest entry)")
    assert logits_diff <= TOL and grads <= TOL

    # Without document ids the later documents see the earlier ones: the test above can fail.
    with torch.no_grad():
        assert float((model(batch["input_ids"]) - packed).abs().max()) > 100 * TOL


def test_one_document_is_the_plain_causal_model() -> None:
    model = model_for("model.positions=rotary")
    ids = packed_batch()["input_ids"]
    with torch.no_grad():
        assert float((model(ids, document_ids=torch.zeros_like(ids)) - model(ids)).abs().max()) <= 1e-6
        with pytest.raises(ValueError, match="incremental decoding"):
            model(ids, document_ids=torch.zeros_like(ids), cache=model.new_cache())


@pytest.mark.parametrize("extra", [["model.positions=rotary", *HEADS["gqa"]],
                                   ["model.positions=relative", "model.relative_buckets=8",
                                    "model.relative_max_distance=16", "model.tie_embeddings=false"],
                                   ["model.positions=learned"]], ids=["rotary-gqa", "relative-untied", "learned"])
def test_pipeline_layers_carry_document_ids(extra) -> None:
    """The pipeline's layer sequence (`layer_specs`), run one layer after the other in this process with the
    first stage's inputs from `pipeline_inputs`, computes the model's logits."""
    from bigtrain.parallel.pipeline import layer_specs, pipeline_inputs

    model = model_for(*extra)
    batch = packed_batch()
    built: dict[str, torch.nn.Module] = {}
    flow = pipeline_inputs(batch, "causal")
    for spec in layer_specs(model, lambda piece: None, documents=True):
        key = getattr(spec, "key", None)  # a TiedLayerSpec: one module wherever the key recurs
        if key is not None and key not in built:
            built[key] = spec.build()
        layer = built[key] if key is not None else spec.build()
        forward_fn = getattr(spec, "forward_fn", None)
        flow = forward_fn(layer, flow) if forward_fn is not None else layer(flow)
    assert float((flow - model(**model_inputs(batch))).detach().abs().max()) <= 1e-6


@pytest.mark.launches
def test_pipeline_training_matches_single_device(tmp_path: Path) -> None:
    """2 pipeline stages (DeepSpeed's pipeline engine, 4 micro-batches in flight, document ids crossing the stage
    boundary as int64) train 20 steps like one process with document masking: loss and grad_norm within 1e-5,
    eval_loss within 1e-6 (about 10 s)."""
    layout = ("train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=10",
              "data.document_masking=true", "model.positions=rotary", "model.n_kv_heads=2")
    single_process(tiny_overrides(tmp_path / "one" / "run", "causal", *layout))
    out = launch_ok(2, tiny_overrides(tmp_path / "pp" / "run", "causal", *layout, "parallel.pipeline=2"))
    assert "PipelineEngine" in out
    assert_same_curve(tmp_path / "one" / "run", tmp_path / "pp" / "run", TOL, eval_rel=1e-6)


@pytest.mark.launches
def test_tensor_and_sequence_parallel_match_one_device(tmp_path: Path) -> None:
    """TP=2 and TP=2 with sequence parallelism (2 gloo ranks): the gathered logits and every gradient of a packed
    batch with document ids equal the unsplit model's (1e-5 of the largest entry)."""
    out = tmp_path / "results.jsonl"
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           str(REPO / "tests" / "helpers" / "document_masking_tp.py"), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        print(f"\nmeasured {r['case']} sequence_parallel={r['sequence_parallel']}: logits {r['logits']:.1e}, "
              f"worst gradient {r['grads']:.1e}")
        assert r["logits"] <= TOL and r["grads"] <= TOL, r


# --- data -------------------------------------------------------------------------------------------------

def _corpus_config(tmp_path: Path, masking: bool):
    source = tmp_path / "docs.jsonl"
    if not source.exists():
        texts = [f"document {i}: " + "x" * (3 * i + 1) for i in range(12)]
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return load_config(None, ["model.family=causal", f"data.source={source}", "data.seq_len=16",
                              "data.holdout_fraction=0.2", f"data.cache_dir={tmp_path / 'cache'}",
                              f"data.document_masking={str(masking).lower()}"])


def test_blocks_number_documents_from_the_separator(tmp_path: Path) -> None:
    """document_ids start at 0 in each block and grow by one right after each end-of-document token; they agree
    with the corpus's document ends; inputs and labels are those of the option off (which has no ids)."""
    byte = ByteTokenizer()
    cfg = _corpus_config(tmp_path, masking=True)
    train, heldout = build_datasets(cfg, byte)
    plain_train, _ = build_datasets(_corpus_config(tmp_path, masking=False), byte)
    doc_ends = load_corpus(cfg.data, byte).doc_ends
    several = 0
    for index in range(len(train)):
        sample, plain = train[index], plain_train[index]
        assert "document_ids" not in plain
        assert torch.equal(sample["input_ids"], plain["input_ids"]) and torch.equal(sample["labels"], plain["labels"])
        ids, docs = sample["input_ids"], sample["document_ids"]
        assert docs.dtype == torch.int64 and docs.shape == ids.shape and docs[0] == 0
        assert torch.equal(docs[1:] - docs[:-1], (ids[:-1] == byte.eos_id).long())
        start = index * cfg.data.seq_len
        expected = np.searchsorted(doc_ends, np.arange(start, start + cfg.data.seq_len), side="right")
        assert docs.tolist() == (expected - expected[0]).tolist()
        several += int(docs[-1]) >= 1
    assert several > 0 and "document_ids" in heldout[0]

    batch = collate([train[0], train[1]], "causal", byte.pad_id, pad_multiple=5)  # 16 -> 20 (sequence parallel)
    assert sorted(batch) == ["document_ids", "input_ids", "labels"]
    assert batch["document_ids"].shape == (2, 20) and (batch["document_ids"][:, 16:] == -1).all()
    assert sorted(collate([plain_train[0]], "causal", byte.pad_id)) == ["input_ids", "labels"]


def test_short_training_run_with_document_masking(run_dir: Path) -> None:
    from bigtrain.train.trainer import Trainer

    trainer = Trainer(tiny_config(run_dir, "causal", "data.document_masking=true", "train.steps=3"))
    batch = trainer.data.host_micro_batches(0)[0]
    assert batch["document_ids"].shape == batch["input_ids"].shape
    result = trainer.run()
    assert result.state.step == 3 and np.isfinite(result.last_eval["eval_loss"])


# --- config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,extra", [("masked", []), ("seq2seq", ["data.source=reverse"])])
def test_families_that_do_not_pack_are_refused(family, extra) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"model.family={family}", *extra, "data.document_masking=true"])
    message = str(error.value)
    assert "data.document_masking" in message and "model.family=causal" in message and "\n" not in message
