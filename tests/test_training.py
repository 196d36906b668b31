"""The training loop: gradient accumulation, checkpointing variants, the three families, failures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.config.layout import Layout
from bigtrain.data import GlobalBatchSampler, build_datasets, build_tokenizer
from bigtrain.data.collate import collate
from bigtrain.engine.evaluate import EvalSums, evaluate
from bigtrain.engine.local import LocalEngine
from bigtrain.engine.step import StepEngine
from bigtrain.errors import TrainingError
from bigtrain.models import build_model
from bigtrain.models.loss import Criterion
from bigtrain.optim import build_optimizer
from bigtrain.parallel import ParallelModel, apply_activation_checkpointing
from bigtrain.train.trainer import Trainer, train
from tests.conftest import tiny_config, tiny_overrides


def _setup(run_dir, family="causal", *extra):
    cfg = tiny_config(run_dir, family, *extra)
    tok = build_tokenizer(cfg.data)
    train_set, _ = build_datasets(cfg, tok)
    return cfg, tok, train_set


def _batches(samples, family, pad_id, micro):
    return [collate(samples[s:s + micro], family, pad_id) for s in range(0, len(samples), micro)]


def _plain_engine(cfg, model, optimizer):
    """The plain engine's step skeleton around `model`, stepping `optimizer`."""
    engine = LocalEngine(cfg, Layout(), ParallelModel(model, Criterion(), Layout()), None, torch.device("cpu"))
    engine.optimizer, engine.params = optimizer, [p for g in optimizer.param_groups for p in g["params"]]
    return engine


@pytest.mark.parametrize("family", ["causal", "masked", "seq2seq"])
def test_gradient_accumulation_matches_one_big_batch(run_dir, family):
    """4 micro-batches of 2 give the same update as one batch of 8 (fp32, 1e-6).

    With SGD (lr 1) the update is the clipped gradient itself, checked at 1e-6. AdamW is checked at 1e-5:
    its first step is m/(sqrt(v)+eps) ≈ sign(g), which amplifies rounding in gradients near eps.
    """
    cfg, tok, train_set = _setup(run_dir, family, "optim.grad_clip=0.5")
    bucket = 1 if family == "causal" else 4
    samples = [train_set[i] for i in GlobalBatchSampler(train_set, 8, 0, bucket).indices(0)]
    for make_opt, lr, tol in ((lambda m: torch.optim.SGD(m.parameters(), lr=1.0), 1.0, 1e-6),
                              (lambda m: build_optimizer(m, cfg.optim), cfg.optim.lr, 1e-5)):
        results = []
        for micro in (8, 2):
            model = build_model(cfg.model, 320, "cpu", seed=3)
            before = [p.detach().clone() for p in model.parameters()]
            engine = _plain_engine(cfg, model, make_opt(model))
            res = engine.train_step(_batches(samples, family, tok.pad_id, micro), lr).resolved()
            results.append((res, [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]))
        (big, big_update), (small, small_update) = results
        assert big.loss == pytest.approx(small.loss, rel=1e-6)
        assert big.grad_norm == pytest.approx(small.grad_norm, rel=1e-6)
        assert big.grad_norm > cfg.optim.grad_clip  # clipping was active in both
        for a, b in zip(big_update, small_update, strict=True):
            assert (a - b).abs().max() <= tol


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_gradients(run_dir, mode):
    cfg, tok, train_set = _setup(run_dir, "seq2seq", "model.dropout=0.1")
    batch = collate([train_set[i] for i in range(8)], "seq2seq", tok.pad_id)
    grads = []
    for ac in ("none", mode):
        model = build_model(cfg.model, 320, "cpu", seed=1)
        apply_activation_checkpointing(model, ac)
        torch.manual_seed(0)  # same dropout masks: checkpointing restores the RNG when recomputing
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-6


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family,extra", [
    ("causal", ()),
    ("masked", ("train.steps=60",)),
    # Reverse a string: the original Transformer's Xavier init, which suits this narrow model better than 0.02.
    ("seq2seq", ("train.steps=300", "schedule.warmup_steps=20", "model.d_model=64", "model.init=xavier",
                 "train.global_batch_size=32", "train.micro_batch_size=32")),
])
def test_each_family_trains(run_dir, family, extra, capsys):
    """Held-out loss falls for every family; accuracy is reported for masked and seq2seq."""
    cfg = tiny_config(run_dir, family, "train.eval_every=10", *extra)
    trainer = Trainer(cfg)
    initial = evaluate(trainer.engine.model, trainer.data.heldout_batches(), trainer.engine.autocast)
    result = trainer.run()
    final = result.last_eval
    assert final["eval_loss"] < initial["eval_loss"] - 0.3, (initial, final)
    evals = [r for r in _records(run_dir) if "eval_loss" in r]
    assert len(evals) == cfg.train.steps // 10
    out = capsys.readouterr().out
    if family != "causal":
        assert "token accuracy" in out
        assert final["eval_accuracy"] > initial["eval_accuracy"] + 0.1
    if family == "seq2seq":
        assert final["eval_accuracy"] > 0.6
        print(f"seq2seq reverse: token accuracy {final['eval_accuracy']:.3f}, "
              f"sequence accuracy {final['eval_sequence_accuracy']:.3f}")


def test_metrics_and_run_dir_layout(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run_dir, "causal", "log.tensorboard=true", "log.every=5",
                                            "train.steps=10", "train.eval_every=5", "checkpoint.every=5",
                                            "train.sample_tokens=20"))
    train(cfg)
    assert (run_dir / "config.yaml").exists()
    assert list((run_dir / "tensorboard").glob("events.*"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    records = _records(run_dir)
    training = [r for r in records if "loss" in r]
    assert [r["step"] for r in training] == [5, 10]
    for r in training:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= r.keys()
        assert r["tokens"] == r["step"] * 8 * 32
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10]
    # That README's metrics.jsonl table names exactly the fields written: tests/test_docs_code.py.


def test_rerun_of_finished_run_does_nothing(run_dir):
    cfg = tiny_config(run_dir, "causal", "train.steps=4")
    first = train(cfg)
    lines = (run_dir / "metrics.jsonl").read_text()
    again = train(cfg)
    assert again.state.step == first.state.step == 4
    assert (run_dir / "metrics.jsonl").read_text() == lines


def test_nonfinite_loss_stops_with_step(run_dir):
    trainer = Trainer(tiny_config(run_dir, "causal", "train.steps=6"))
    _poison_forward(trainer.engine.model, at_call=3)
    with pytest.raises(TrainingError, match="step 3.*train.on_nonfinite=skip"):
        trainer.run()


def test_nonfinite_loss_skipped_when_configured(run_dir):
    trainer = Trainer(tiny_config(run_dir, "causal", "train.steps=6", "train.on_nonfinite=skip"))
    _poison_forward(trainer.engine.model, at_call=3)
    result = trainer.run()
    records = _records(run_dir)
    assert result.state.step == 6
    assert [r["skipped"] for r in records if "loss" in r] == [False, False, True, False, False, False]
    assert all(math.isfinite(p.sum().item()) for p in trainer.engine.model.parameters())


@pytest.mark.parametrize("extra,last", [
    (("train.on_nonfinite=skip", "train.max_skipped_steps=3"), 4),
    (("train.on_nonfinite=stop",), 2),
], ids=["skip-limit", "stop"])
def test_the_step_that_ends_the_run_has_its_metrics_line(run_dir, extra, last):
    """Every step from the 2nd on is non-finite: the step whose error ends the run (the 3rd skip in a row, or the
    first non-finite step under `stop`) is in metrics.jsonl like the skipped ones before it (issue 25)."""
    trainer = Trainer(tiny_config(run_dir, "causal", "train.steps=8", *extra))
    _poison_forward(trainer.engine.model, at_call=2, onwards=True)
    with pytest.raises(TrainingError, match=f"step {last}|steps 2-{last}"):
        trainer.run()
    training = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in training] == list(range(1, last + 1))
    assert [r["skipped"] for r in training] == [False] + [True] * (last - 1)
    assert training[-1]["loss"] is None  # not finite: written as null


def _poison_forward(model, at_call: int, onwards: bool = False) -> None:
    forward, calls = model.forward, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = forward(*args, **kwargs)
        hit = calls["n"] >= at_call if onwards else calls["n"] == at_call
        return out * float("nan") if hit else out

    model.forward = poisoned


def test_early_stopping(run_dir, monkeypatch):
    losses = iter([3.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    monkeypatch.setattr(StepEngine, "evaluate_sums", lambda *a, **k: EvalSums(loss_sum=next(losses), targets=1))
    result = train(tiny_config(run_dir, "causal", "train.steps=12", "train.eval_every=2",
                               "train.early_stop_patience=2"))
    assert result.stopped_early and result.state.step == 8


def test_bf16_autocast_on_cpu(run_dir):
    result = train(tiny_config(run_dir, "causal", "train.steps=3", "train.precision=bf16"))
    assert math.isfinite(result.last_eval["eval_loss"])


def test_a_finished_run_run_again_says_done_and_prints_no_sample(run_dir, capsys):
    """The second `make smoke`: the run resumes at its last step, trains nothing, prints no second sample."""
    from bigtrain.cli.train import run_train

    args = tiny_overrides(run_dir, "causal", "train.steps=2", "train.sample_tokens=8")
    assert run_train(args) == 0
    assert "--- sample" in capsys.readouterr().out
    assert run_train(args) == 0
    out = capsys.readouterr().out
    assert "--- sample" not in out and "done: step 2 (nothing left to train)" in out, out[-2000:]
