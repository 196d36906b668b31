"""The fairscale engine (issue 18): OSS (ZeRO-1 equivalent) and OSS + ShardedDataParallel (ZeRO-2 equivalent)
on CPU ranks over gloo, fp32, tolerance 1e-5: equal to one device with AdamW and LAMB, also under TP=2 x DP=2;
equal to DeepSpeed's ZeRO-1 / ZeRO-2 step by step; optimizer state halved at DP=2; exact resume. Moving a run
between the DeepSpeed and fairscale engines is in tests/test_layout_change.py; refusals at config load here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigtrain.config import load_config
from bigtrain.errors import ConfigError
from tests.conftest import (
    DP_LAYOUT,
    LAMB,
    assert_resume_is_exact,
    assert_same_curve,
    launch_ok,
    tiny_overrides,
)

FAIRSCALE = "parallel.engine=fairscale"


def _overrides(run_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(run_dir, "causal", *DP_LAYOUT, *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, deepspeed_zero_runs) -> dict[str, Path]:
    """20 steps of each ZeRO stage, 2 ranks: fairscale, and DeepSpeed on the same config (the session's runs)."""
    out = {f"deepspeed{stage}": run_dir for stage, (run_dir, _) in deepspeed_zero_runs.items()}
    for stage in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"fairscale{stage}") / "run"
        launch_ok(2, _overrides(run_dir, FAIRSCALE, f"parallel.zero_stage={stage}"))
        out[f"fairscale{stage}"] = run_dir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_equals_one_device_and_deepspeed(causal_reference, runs, stage):
    """Loss and grad_norm of 20 steps within 1e-5 of one process, and of DeepSpeed's ZeRO stage step by step."""
    assert_same_curve(causal_reference, runs[f"fairscale{stage}"], rel=1e-5)
    assert_same_curve(runs[f"deepspeed{stage}"], runs[f"fairscale{stage}"], rel=1e-5)
    engine = json.loads((runs[f"fairscale{stage}"] / "engine_config.json").read_text())
    assert engine["engine"] == "fairscale" and engine["zero_stage"] == stage
    assert engine["gradient_sharding"] == ("ShardedDataParallel" if stage == 2 else "all-reduce")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_lamb_is_exact(lamb_reference, tmp_path, stage):
    """OSS shards whole tensors, so LAMB's per-tensor trust ratios are those of one device: 10 steps, 1e-5."""
    run_dir = tmp_path / "run"
    launch_ok(2, _overrides(run_dir, *LAMB, FAIRSCALE, f"parallel.zero_stage={stage}"))
    assert_same_curve(lamb_reference, run_dir, rel=1e-5, steps=10)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, stage", [("adamw", 2), ("lamb", 1)])
def test_tensor_parallel_by_data_parallel(causal_reference, lamb_reference, tmp_path, optimizer, stage):
    """TP=2 x DP=2 (4 ranks): the data group of the layout is fairscale's; LAMB's norms of tensor shards are
    summed over the tensor group."""
    run_dir = tmp_path / "run"
    extra = LAMB if optimizer == "lamb" else ()
    launch_ok(4, _overrides(run_dir, *extra, FAIRSCALE, f"parallel.zero_stage={stage}", "parallel.tensor=2"))
    reference = lamb_reference if optimizer == "lamb" else causal_reference
    assert_same_curve(reference, run_dir, rel=1e-5, steps=10 if optimizer == "lamb" else 20)


@pytest.mark.slow
def test_optimizer_state_halves_with_two_ranks(runs, tmp_path):
    """Optimizer-state bytes per rank at DP=2 within 5% of half the one-rank figure, and of the ZeRO formula
    (fp32 weights, K = 8: no master copy)."""
    one = tmp_path / "one"
    launch_ok(1, _overrides(one, FAIRSCALE, "parallel.zero_stage=1", "train.steps=2"))
    single = json.loads((one / "memory.json").read_text())["ranks"][0]["optimizer"]
    for stage in (1, 2):
        memory = json.loads((runs[f"fairscale{stage}"] / "memory.json").read_text())
        assert memory["engine"] == "fairscale" and memory["n_params"] == 27392
        for rank in memory["ranks"]:
            assert rank["optimizer"] == pytest.approx(single / 2, rel=0.05), memory
            assert rank["optimizer"] == pytest.approx(memory["formula"]["optimizer"], rel=0.05), memory
            assert rank["params"] == memory["formula"]["params"]
        print(f"\nZeRO-{stage} equivalent: optimizer bytes per rank {[r['optimizer'] for r in memory['ranks']]} "
              f"at DP=2, {single} at DP=1")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_is_exact(tmp_path, stage):
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, FAIRSCALE, f"parallel.zero_stage={stage}", "checkpoint.every=10",
                      "train.eval_every=10", "model.dropout=0.1")
    assert_resume_is_exact(2, args, run_dir)


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.zero_stage=0"], "set parallel.zero_stage to 1 (OSS)"),
    (["parallel.zero_stage=1", "parallel.pipeline=2"], "has no pipeline schedule"),
    (["parallel.zero_stage=1", "train.precision=fp16"], "train.precision=fp16 would need"),
    (["parallel.zero_stage=3", "train.device=cpu"], "runs on CUDA GPUs only"),
    (["parallel.zero_stage=3", "train.device=cuda", "optim.name=lamb"], "per-tensor trust ratios"),
    (["parallel.zero_stage=2", "parallel.offload_optimizer=true"], "parallel.offload_optimizer=true is DeepSpeed's"),
    (["parallel.zero_stage=1", "deepspeed.steps_per_print=5"], "deepspeed: section is set"),
])
def test_refused_at_config_load(overrides, needle, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(None, _overrides(tmp_path / "run", FAIRSCALE, *overrides), world_size=4)
    assert needle in str(error.value) and "\n" not in str(error.value)
