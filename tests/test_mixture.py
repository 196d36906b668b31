"""Mixtures of sources (`data.sources`, issue 17 item 3): proportions within 1% over 10,000 samples (and over
any window), blending by global sample index (identical batches under DP=1 and DP=2, exact resume),
per-source tokens, samples and epochs in metrics.jsonl, and one-paragraph errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.config import load_config
from bigtrain.data.mixture import Mixture, quotas
from bigtrain.data.sampler import MixtureSampler
from bigtrain.errors import ConfigError, DataError
from bigtrain.train.trainer import Trainer
from tests.conftest import (
    DP_LAYOUT,
    REPO,
    assert_resume_is_exact,
    launch_ranks,
    read_metrics,
    run_launcher,
    tiny_overrides,
)

RECORD = REPO / "tests" / "helpers" / "record_samples.py"


class Numbers(torch.utils.data.Dataset):
    """Samples that say where they come from: {"input_ids": [source, index]}, length 2 + index % 3."""

    def __init__(self, source: int, size: int) -> None:
        self.source, self.size = source, size
        self.lengths = np.array([2 + i % 3 for i in range(size)])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([self.source, i])}


def _mixture(weights=(3.0, 1.0, 0.5), sizes=(500, 300, 50), seed=7) -> Mixture:
    return Mixture([Numbers(k, n) for k, n in enumerate(sizes)], weights, [f"s{k}" for k in range(len(sizes))],
                   seed)


def test_proportions_within_one_percent_over_10000_samples():
    mixture = _mixture()
    sampler = MixtureSampler(mixture, global_batch_size=100, seed=7)
    share = np.array([3.0, 1.0, 0.5]) / 4.5
    for first_step in (0, 37, 1000):  # 10,000 samples = 100 steps, from several starting points
        samples = [mixture[i]["input_ids"][0].item() for s in range(first_step, first_step + 100)
                   for i in sampler.indices(s)]
        measured = np.bincount(samples, minlength=3) / len(samples)
        assert np.all(np.abs(measured - share) <= 0.01), (first_step, measured, share)
        print(f"\nsteps {first_step}..{first_step + 99}: measured shares {np.round(measured, 4)}, weights "
              f"{np.round(share, 4)}")
    # any window, not just whole periods: W·w_k ± 2
    sources, _ = mixture.locate(np.arange(123_456, 123_456 + 777))
    assert np.all(np.abs(np.bincount(sources, minlength=3) - 777 * share) <= 2)


def test_blending_is_a_pure_function_of_the_position():
    """Two mixtures built alike give the same sample at any position, read in any order; each source is drawn
    without repetition within its epoch, and the epochs counted match the draws."""
    a, b = _mixture(), _mixture()
    positions = list(range(0, 30_000, 7))
    random.Random(0).shuffle(positions)
    for i in positions[:500]:
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
    first_epoch = [a[i]["input_ids"].tolist() for i in range(50_000)]
    small = [index for source, index in first_epoch if source == 2]  # 50 samples, weight 0.5/4.5
    assert len(small) == a.draws_before(50_000)[2] and sorted(small[:50]) == list(range(50))
    assert a.epochs_before(50_000)[2] == pytest.approx(len(small) / 50)
    assert _mixture(seed=8)[5]["input_ids"].tolist() != a[5]["input_ids"].tolist() or \
        _mixture(seed=8)[6]["input_ids"].tolist() != a[6]["input_ids"].tolist()


def test_quotas_by_largest_remainder():
    assert quotas([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert quotas([1, 0, 3], 8).tolist() == [2, 0, 6]
    assert quotas([2, 1], 10_000).sum() == 10_000


def _corpus(tmp_path: Path, docs: int = 300) -> Path:
    path = tmp_path / "extra.jsonl"
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "mixture", "source", "weight", "token"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n"
                            for _ in range(docs)))
    return path


def _mixture_overrides(run_dir: Path, extra: Path, *more: str) -> list[str]:
    sources = f"data.sources=[{{source: embedded, weight: 3}}, {{source: {extra}, weight: 1, name: extra}}]"
    return tiny_overrides(run_dir, "causal", *DP_LAYOUT, sources, *more)


def test_metrics_report_tokens_samples_and_epochs_per_source(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(None, _mixture_overrides(run_dir, _corpus(tmp_path), "train.steps=4", "log.every=2"))
    trainer = Trainer(cfg)
    trainer.run()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "sources" in r]
    assert [r["step"] for r in logged] == [2, 4]
    last = logged[-1]
    sources = last["sources"]
    assert set(sources) == {"embedded", "extra"}
    assert sum(s["tokens"] for s in sources.values()) == last["tokens"]  # every input token, by source
    assert sum(s["samples"] for s in sources.values()) == 4 * 8
    assert sources["embedded"]["samples"] == 24 and sources["extra"]["samples"] == 8  # weights 3 : 1
    mixture = trainer.data.train_set
    for k, name in enumerate(mixture.names):
        assert sources[name]["epochs"] == pytest.approx(sources[name]["samples"] / len(mixture.datasets[k]))


@pytest.mark.launches
def test_same_batches_under_dp1_and_dp2_and_exact_resume(tmp_path):
    """The global samples of every step and the loss curve are those of one process under 2 data-parallel
    ranks (ZeRO-1); a resumed mixture run is bitwise the uninterrupted one, per-source counts included."""
    extra = _corpus(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_launcher(_mixture_overrides(one, extra, "train.steps=6"), script=RECORD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch_ranks(2, _mixture_overrides(two, extra, "train.steps=6", "parallel.zero_stage=1"), script=RECORD)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    samples = [(d / "samples.jsonl").read_text() for d in (one, two)]
    assert samples[0] == samples[1] and samples[0].count("\n") == 6
    a, b = read_metrics(one)[0], read_metrics(two)[0]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
        assert b[step]["sources"] == a[step]["sources"]
    resumed = tmp_path / "resumed"
    assert_resume_is_exact(2, _mixture_overrides(resumed, extra, "checkpoint.every=10", "train.eval_every=10"),
                           resumed)
    assert read_metrics(resumed)[0][20]["sources"]["extra"]["samples"] == 40  # 20 steps x 8 x 1/4


def test_bad_sources_give_one_paragraph(tmp_path):
    with pytest.raises(DataError) as error:
        Trainer(load_config(None, tiny_overrides(tmp_path / "run", "causal",
                                                 "data.sources=[{source: embedded}, {source: /nonexistent/x.jsonl}]")))
    message = str(error.value)
    assert message.startswith("data.sources[1].source='/nonexistent/x.jsonl'") and "\n" not in message
    for bad, needle in [("[{source: embedded, weight: -1}]", "data.sources[0].weight must be"),
                        ("[{source: embedded, weight: 0}, {source: x, weight: 0}]", "every weight is 0"),
                        ("[{source: reverse}]", "generated seq2seq task"),
                        ("[{source: embedded}, {source: embedded}]", "occur more than once")]:
        with pytest.raises(ConfigError) as error:
            load_config(None, [f"data.sources={bad}"])
        assert needle in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="model.family='seq2seq'"):
        load_config(None, ["model.family=seq2seq", "data.source=reverse", "data.sources=[{source: embedded}]"])
