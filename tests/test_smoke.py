"""`make smoke`'s promise: the smoke config trains to a held-out loss of at most 2.3 nats per byte, then prints
a sample. (Its speed, under 3 minutes of training on a 2-core CPU, is a figure of `python bench/wallclock.py`.)
The trained run is also the first model a user exports to Hugging Face: its final checkpoint goes to transformers'
GPT-NeoX with the same logits on held-out text. The run is trained once, for the whole module."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, require, run_launcher

pytestmark = pytest.mark.launches


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python launch/train.py --config configs/smoke.yaml` into a fresh run.dir: (run.dir, the process)."""
    base = tmp_path_factory.mktemp("smoke")
    run_dir = base / "smoke"
    proc = run_launcher(["--config", str(REPO / "configs/smoke.yaml"), f"run.dir={run_dir}",
                         f"data.cache_dir={base / 'cache'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_smoke_config_reaches_target(smoke_run):
    run_dir, proc = smoke_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "loss" in r]
    final_eval = [r for r in records if "eval_loss" in r][-1]
    seconds = training[-1]["elapsed_s"]
    mean_tps = training[-1]["tokens"] / seconds
    print(f"smoke: held-out loss {final_eval['eval_loss']:.3f} nats/byte after {training[-1]['step']} steps, "
          f"{seconds:.0f} s of training, {mean_tps:.0f} tokens/s")
    assert final_eval["step"] == training[-1]["step"] == 140
    assert final_eval["eval_loss"] <= 2.3
    assert "--- sample" in proc.stdout


def test_smoke_run_exports_to_transformers_with_its_logits(smoke_run, tmp_path):
    """`bigtrain export RUN_DIR --format hf`: transformers' GPTNeoXForCausalLM of the folder gives the trained
    model's logits on held-out blocks within 1e-4 (fp32), and its tokenizer encodes them as the run did."""
    try:
        import transformers
    except ImportError:  # a test dependency: pip install -e .[dev]
        transformers = None
    require(transformers is not None, "transformers is not installed (pip install -e .[dev])")
    from bigtrain.cli.tools import run_export
    from bigtrain.data import build_datasets
    from bigtrain.inference.load import load_model

    run_dir, _ = smoke_run
    assert run_export([str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    loaded = load_model(run_dir)
    _, heldout = build_datasets(loaded.cfg, loaded.tokenizer)
    ids = torch.stack([heldout[i]["input_ids"] for i in range(min(4, len(heldout)))])
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        diff = (loaded.model.eval()(ids) - hf(input_ids=ids).logits).abs().max().item()
    print(f"smoke run export: max |logit difference| {diff:.1e} over {ids.numel()} held-out tokens "
          f"(bigtrain vs transformers GPTNeoXForCausalLM, fp32)")
    assert diff <= 1e-4, diff
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = loaded.tokenizer.decode(ids[0].tolist())
    assert tokenizer(text)["input_ids"] == loaded.tokenizer.encode(text)
