"""`bigtrain eval-harness` (issue 31, item 4): lm-eval-harness tasks of the repository (tests/fixtures/eval_harness:
a local JSONL file, no download) scored by bigtrain's model equal the scores computed here by hand from the
model's logits, and a model split over two tensor-parallel ranks gives the one-device scores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from bigtrain.cli import main as cli_main
from bigtrain.config import config_to_dict, load_config
from bigtrain.data import ByteTokenizer
from bigtrain.distributed.rendezvous import free_port
from bigtrain.models import build_model, resolve_vocab_size
from tests.conftest import REPO, require_module, tiny_overrides
from tests.helpers.tensor_generation import lively

FIXTURES = REPO / "tests" / "fixtures" / "eval_harness"
TASKS = "bigtrain_tiny_loglikelihood,bigtrain_tiny_choice,bigtrain_tiny_rolling,bigtrain_tiny_generate"
ROWS = [json.loads(line) for line in (FIXTURES / "tiny.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A folder like `bigtrain export` writes, of a tiny causal model with widely spread random weights (no two
    choices near a tie, so that one device and two shards rank them alike), and that model."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("eval_harness") / "weights"
    folder.mkdir()
    cfg = load_config(None, tiny_overrides(folder / "run", "causal"))
    model = lively(build_model(cfg.model, resolve_vocab_size(cfg.model, ByteTokenizer.vocab_size), "cpu", seed=0),
                   std=0.15)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"},
              str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return folder, model


def _by_hand(model: torch.nn.Module, context: str, continuation: str) -> float:
    """log p(continuation | context) = Σ_i log softmax(z_{m+i-1})[x_i], the logits z of one forward of the whole
    text (context ids, an empty context being eos, then the continuation's ids)."""
    tok = ByteTokenizer()
    ctx, cont = tok.encode(context) or [tok.eos_id], tok.encode(continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont]))[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[len(ctx) + i - 1, token].item() for i, token in enumerate(cont))


def _greedy_by_hand(model: torch.nn.Module, context: str, steps: int) -> str:
    """argmax decoding without a cache (the tokenizer's ids only), cut at the first newline or eos."""
    tok = ByteTokenizer()
    ids = tok.encode(context) or [tok.eos_id]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new]))[0, -1, :tok.vocab_size].argmax())
            if token == tok.eos_id:
                break
            new.append(token)
    return tok.decode(new).split("\n")[0]


def _evaluate(folder: Path, out: Path, monkeypatch) -> dict:
    monkeypatch.chdir(REPO)  # the task YAMLs name their data file from the repository root
    assert cli_main(["eval-harness", str(folder), "--tasks", TASKS, "--include-path", str(FIXTURES),
                     "--output", str(out)]) == 0
    return json.loads(out.read_text())["results"]


def test_scores_equal_the_hand_computed_loglikelihoods(weights, tmp_path, monkeypatch, capsys):
    require_module("lm_eval", "lm-eval is not installed (pip install -e .[dev])")
    folder, model = weights
    results = _evaluate(folder, tmp_path / "results.json", monkeypatch)
    assert "bigtrain_tiny_choice" in capsys.readouterr().out  # lm-eval's table

    ll = [_by_hand(model, r["context"], r["continuation"]) for r in ROWS]
    perplexity = results["bigtrain_tiny_loglikelihood"]["perplexity,none"]
    assert math.log(perplexity) == pytest.approx(-sum(ll) / len(ll), rel=1e-6)

    chosen = [max(range(len(r["choices"])), key=lambda c: _by_hand(model, r["context"], r["choices"][c]))
              for r in ROWS]
    assert results["bigtrain_tiny_choice"]["acc,none"] == pytest.approx(
        sum(c == r["label"] for c, r in zip(chosen, ROWS, strict=True)) / len(ROWS))

    rolling = [_by_hand(model, "", r["text"]) for r in ROWS]  # every text fits one window: all from eos
    text_bytes = sum(len(r["text"].encode()) for r in ROWS)
    assert results["bigtrain_tiny_rolling"]["bits_per_byte,none"] == pytest.approx(
        -sum(rolling) / text_bytes / math.log(2), rel=1e-6)

    generated = [_greedy_by_hand(model, r["context"], 8) for r in ROWS]
    assert results["bigtrain_tiny_generate"]["exact_match,none"] == pytest.approx(
        sum(g == r["continuation"] for g, r in zip(generated, ROWS, strict=True)) / len(ROWS))


def test_generate_until_is_greedy_with_the_cache(weights):
    """The adapter's generate_until: the greedy text computed by hand, cut before the stop string."""
    require_module("lm_eval", "lm-eval is not installed (pip install -e .[dev])")
    from bigtrain.inference.lm_eval_adapter import BigtrainLM
    from bigtrain.inference.load import load_model

    folder, model = weights
    lm = BigtrainLM(load_model(folder))
    requests = [SimpleNamespace(args=(r["context"], {"until": ["\n"], "max_gen_toks": 8})) for r in ROWS]
    assert lm.generate_until(requests) == [_greedy_by_hand(model, r["context"], 8) for r in ROWS]
    with pytest.raises(Exception, match="decodes greedily only"):
        lm.generate_until([SimpleNamespace(args=("x", {"do_sample": True}))])


def test_unknown_task_is_one_paragraph(weights, capsys):
    require_module("lm_eval", "lm-eval is not installed (pip install -e .[dev])")
    assert cli_main(["eval-harness", str(weights[0]), "--tasks", "no_such_task_here", "--include-path",
                     str(FIXTURES)]) == 2
    assert "no_such_task_here is not a task of lm-eval or in" in capsys.readouterr().err


@pytest.mark.launches
@pytest.mark.parametrize("extra", [(), ("parallel.sequence_parallel=true",)], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_scores_equal_one_device(weights, tmp_path, monkeypatch, extra):
    """`torchrun --nproc_per_node 2 -m bigtrain.cli eval-harness ...`: every score of the one-device model (under
    sequence parallelism too: rows padded to a multiple of the tensor size, generation recomputed)."""
    require_module("lm_eval", "lm-eval is not installed (pip install -e .[dev])")
    folder, _ = weights
    one = _evaluate(folder, tmp_path / "one.json", monkeypatch)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={free_port()}", "-m", "bigtrain.cli", "eval-harness", str(folder),
                           "--tasks", TASKS, "--include-path", str(FIXTURES), "--output", str(tmp_path / "tp.json"),
                           *extra],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("bigtrain_tiny_choice") == 1  # printed once, by rank 0
    tp = json.loads((tmp_path / "tp.json").read_text())["results"]
    for task, metrics in one.items():
        for name, value in metrics.items():
            if not isinstance(value, float):
                continue
            if "perplexity" in name:  # exp of a mean log-likelihood: compare the log-likelihoods
                assert math.log(tp[task][name]) == pytest.approx(math.log(value), rel=1e-5), (task, name)
            else:
                assert tp[task][name] == pytest.approx(value, rel=1e-5, abs=1e-9), (task, name)


@pytest.mark.launches
def test_a_run_dir_is_scored_from_its_latest_checkpoint(tmp_path, monkeypatch):
    """A trained run.dir (its latest checkpoint, as `bigtrain generate` loads it), --limit 2: the perplexity of the
    first two lines, by hand from the loaded model's logits."""
    require_module("lm_eval", "lm-eval is not installed (pip install -e .[dev])")
    from bigtrain.inference.load import load_model
    from bigtrain.train.trainer import Trainer
    from tests.conftest import tiny_config

    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, "causal", "train.steps=3")).run()
    monkeypatch.chdir(REPO)
    out = tmp_path / "results.json"
    assert cli_main(["eval-harness", str(run_dir), "--tasks", "bigtrain_tiny_loglikelihood", "--limit", "2",
                     "--include-path", str(FIXTURES), "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["n-samples"]["bigtrain_tiny_loglikelihood"]["effective"] == 2
    model = load_model(run_dir).model.eval()
    ll = [_by_hand(model, r["context"], r["continuation"]) for r in ROWS[:2]]
    perplexity = results["results"]["bigtrain_tiny_loglikelihood"]["perplexity,none"]
    assert math.log(perplexity) == pytest.approx(-sum(ll) / 2, rel=1e-6)
