"""`make smoke`'s promise: the smoke config trains to a held-out loss of at most 2.3 nats per byte, then prints
a sample. (Its speed, under 3 minutes of training on a 2-core CPU, is a figure of `python bench/wallclock.py`.)"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_launcher

pytestmark = pytest.mark.launches


def test_smoke_config_reaches_target(tmp_path):
    run_dir = tmp_path / "smoke"
    proc = run_launcher(["--config", str(REPO / "configs/smoke.yaml"), f"run.dir={run_dir}",
                         f"data.cache_dir={tmp_path / 'cache'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
