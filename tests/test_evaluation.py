"""The held-out set is counted in sequences (issue 25): the same checkpoint scores the same `eval_loss` whatever
the micro-batch size, `bigtrain evaluate` scores what training logged, an old config's `train.eval_batches` still
loads and means what it meant, and a mixture reports each source's held-out loss. (The layouts — DP2, TP2, PP2,
ZeRO-3 — are compared with one device where they already train: tests/test_deepspeed.py,
tests/test_tensor_parallel.py, tests/test_pipeline.py, with `assert_same_curve(..., eval_rel=...)`.)"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from bigtrain.cli.tools import evaluate_weights
from bigtrain.train.trainer import Trainer, train
from tests.conftest import EVAL_SAMPLES, REPO, read_metrics, tiny_config


def test_the_held_out_set_is_counted_in_sequences() -> None:
    """train.eval_samples sequences whatever the micro-batch size (the last micro-batch may be short); an old
    config's train.eval_batches means eval_batches x micro_batch_size, as before; a mixture's sources share it."""
    from bigtrain.config.schema import TrainConfig
    from bigtrain.data.heldout import eval_sample_count, eval_size_note, heldout_indices
    from bigtrain.data.mixture import Concatenation

    assert heldout_indices(list(range(100)), 10) == [(None, list(range(10)))]
    assert heldout_indices(list(range(3)), 10) == [(None, [0, 1, 2])]
    assert eval_sample_count(TrainConfig()) == 512 and eval_size_note(TrainConfig()) is None
    assert eval_sample_count(TrainConfig(eval_samples=10, micro_batch_size=4)) == 10
    old = TrainConfig(eval_batches=2, micro_batch_size=4)
    assert eval_sample_count(old) == 8 and "set train.eval_samples=8 instead" in eval_size_note(old)
    both = TrainConfig(eval_batches=2, eval_samples=5)
    assert eval_sample_count(both) == 5 and "train.eval_batches=2 is ignored" in eval_size_note(both)

    class Split(list):
        lengths = ()

    held = Concatenation([Split(range(6)), Split(range(2)), Split(range(5))], ["a", "b", "c"])
    assert heldout_indices(held, 10) == [("a", [0, 1, 2, 3]), ("b", [6, 7]), ("c", [8, 9, 10])]
    assert heldout_indices(held, 2) == [("a", [0]), ("b", [6])]  # a source without a share is left out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny GPT trained 3 steps in this process (a checkpoint and an evaluation at the end)."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    train(tiny_config(run_dir, "causal", "train.steps=3"))
    return run_dir


def test_the_same_weights_score_the_same_under_every_micro_batch_size(trained):
    """One checkpoint evaluated with micro-batches of 1, 2, 4 and 8 sequences (10 held-out sequences: the last
    micro-batch is short for 4 and 8): the same tokens and eval_loss within 1e-5 (fp32). Counted in micro-batches
    (train.eval_batches x micro_batch_size) the sets differed, and so did the numbers (issue 25: 2.7687 at 32,
    2.5761 at 8)."""
    records = {m: evaluate_weights(trained, [f"train.micro_batch_size={m}", "train.eval_samples=10"])
               for m in (1, 2, 4, 8)}
    first = records[1]
    print("\n" + ", ".join(f"micro {m}: {r['eval_loss']:.7f}" for m, r in records.items()))
    for m, record in records.items():
        assert record["eval_tokens"] == first["eval_tokens"] == 10 * 32, m
        assert record["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-5), m
        assert record["eval_accuracy"] == pytest.approx(first["eval_accuracy"], rel=1e-6), m


def test_bigtrain_evaluate_scores_what_training_logged(trained):
    """`bigtrain evaluate` of the final checkpoint reads the held-out set training evaluated (the saved config's
    train.eval_samples), so it gives the run's last eval_loss."""
    _, evals = read_metrics(trained)
    logged = evals[3]
    again = evaluate_weights(trained)
    assert again["eval_tokens"] == logged["eval_tokens"] == EVAL_SAMPLES * 32
    assert again["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)


def test_an_old_config_with_eval_batches_loads_and_keeps_its_held_out_set(tmp_path, capsys):
    """The checkpoints of earlier bigtrains hold `train.eval_batches` in their config.yaml: they load, the set is
    eval_batches x micro_batch_size sequences as before (the console says so, with the key to use now), and a
    resume with train.eval_samples instead is a harmless change (tests/test_fixture_resume.py resumes them)."""
    from bigtrain.checkpoint.compare import check_resume, config_changes
    from bigtrain.checkpoint.saved import SavedCheckpoint
    from bigtrain.data.heldout import eval_sample_count

    fixtures = REPO / "tests" / "fixtures"
    folders = sorted(fixtures.glob("*/*/checkpoints/step_*")) + sorted(fixtures.glob("*/checkpoints/step_*"))
    assert len(folders) == 5
    for folder in folders:
        cfg = SavedCheckpoint.read(folder).config  # as a resume reads it
        assert cfg.train.eval_batches == 2 and cfg.train.eval_samples is None, folder
        assert eval_sample_count(cfg.train) == 2 * cfg.train.micro_batch_size, folder
        now = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_samples=64, eval_batches=None))
        meaningful, harmless = check_resume(config_changes(cfg, now), set(), str(folder))  # a resume may switch
        assert not meaningful and {c.key for c in harmless} == {"train.eval_samples", "train.eval_batches"}

    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, "causal", "train.steps=1", "train.eval_samples=null", "train.eval_batches=2",
                      "train.micro_batch_size=4")
    result = Trainer(cfg).run()
    assert result.last_eval["eval_tokens"] == 2 * 4 * 32
    out = capsys.readouterr().out
    assert ("note: train.eval_batches=2 counts micro-batches: the held-out set is 8 sequences (x "
            "train.micro_batch_size=4), another with another micro-batch size; set train.eval_samples=8 instead") in out


def test_a_mixture_reports_the_held_out_loss_of_each_source(tmp_path):
    """data.sources: the evaluation line holds `eval_sources`, each source's record over its equal share of the
    held-out set; the overall eval_loss is their token-weighted mean, and a source's loss is what evaluating that
    source alone gives (here with `bigtrain evaluate` and the mixture replaced by that one source)."""
    extra = tmp_path / "extra.jsonl"
    rng = random.Random(0)
    extra.write_text("".join(json.dumps({"text": " ".join(rng.choice("abcdefgh") * 3 for _ in range(60))}) + "\n"
                             for _ in range(200)))
    mixture = f"data.sources=[{{source: embedded, weight: 3}}, {{source: {extra}, weight: 0, name: extra}}]"
    run_dir = tmp_path / "run"
    result = train(tiny_config(run_dir, "causal", "train.steps=2", "train.eval_samples=12", mixture))
    _, evals = read_metrics(run_dir)
    line = evals[2]
    assert line == {**result.last_eval, "step": 2}
    sources = line["eval_sources"]
    assert sorted(sources) == ["embedded", "extra"]  # weight 0: evaluated all the same
    assert {name: r["eval_tokens"] for name, r in sources.items()} == {"embedded": 6 * 32, "extra": 6 * 32}
    assert line["eval_tokens"] == 12 * 32
    mean = sum(r["eval_loss"] * r["eval_tokens"] for r in sources.values()) / line["eval_tokens"]
    assert line["eval_loss"] == pytest.approx(mean, rel=1e-9)
    alone = evaluate_weights(run_dir, [f"data.sources=[{{source: {extra}, name: extra}}]", "train.eval_samples=6"])
    assert alone["eval_sources"]["extra"] == sources["extra"]
    assert alone["eval_loss"] == pytest.approx(sources["extra"]["eval_loss"], rel=1e-12)
