"""The fairscale engine (issue 18): OSS (ZeRO-1 equivalent), OSS + ShardedDataParallel (ZeRO-2 equivalent) and
FullyShardedDataParallel (ZeRO-3 equivalent) on CPU ranks over gloo, fp32, tolerance 1e-5: equal to one device
with AdamW (and LAMB for OSS), also under TP=2 x DP=2; equal to DeepSpeed's ZeRO-1 / 2 / 3 step by step;
optimizer state halved at DP=2; exact resume. fairscale runs FSDP on CUDA only: its tests run it on CPU ranks
through tests/helpers/fsdp_on_cpu.py, which stands a host "stream" in for its CUDA streams. Moving a run
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
    REPO,
    assert_resume_is_exact,
    assert_same_curve,
    consolidated_eval_loss,
    launch_ok,
    launch_ranks,
    read_metrics,
    tiny_overrides,
)

FAIRSCALE = "parallel.engine=fairscale"
FSDP = (FAIRSCALE, "parallel.zero_stage=3")
FSDP_ON_CPU = REPO / "tests" / "helpers" / "fsdp_on_cpu.py"


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


@pytest.mark.launches
@pytest.mark.parametrize("stage", [1, 2])
def test_equals_one_device_and_deepspeed(causal_reference, runs, stage):
    """Loss and grad_norm of 20 steps (and the final eval_loss) within 1e-5 of one process, and of DeepSpeed's ZeRO
    stage step by step."""
    assert_same_curve(causal_reference, runs[f"fairscale{stage}"], rel=1e-5, eval_rel=1e-5)
    assert_same_curve(runs[f"deepspeed{stage}"], runs[f"fairscale{stage}"], rel=1e-5)
    engine = json.loads((runs[f"fairscale{stage}"] / "engine_config.json").read_text())
    assert engine["engine"] == "fairscale" and engine["zero_stage"] == stage
    assert engine["gradient_sharding"] == ("ShardedDataParallel" if stage == 2 else "all-reduce")


@pytest.mark.launches
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lamb_is_exact(lamb_reference, tmp_path, stage):
    """OSS shards whole tensors, so LAMB's per-tensor trust ratios are those of one device; under FSDP each
    rank's flat pieces of a parameter are summed over the data group into its norms: 10 steps, 1e-5."""
    run_dir = tmp_path / "run"
    launch_ok(2, _overrides(run_dir, *LAMB, FAIRSCALE, f"parallel.zero_stage={stage}"),
              script=FSDP_ON_CPU if stage == 3 else None)
    assert_same_curve(lamb_reference, run_dir, rel=1e-5, steps=10)


@pytest.mark.launches
@pytest.mark.parametrize("optimizer, stage", [("adamw", 2), ("lamb", 1), ("lamb", 3)])
def test_tensor_parallel_by_data_parallel(causal_reference, lamb_reference, tmp_path, optimizer, stage):
    """TP=2 x DP=2 (4 ranks): the data group of the layout is fairscale's; LAMB's norms of tensor shards are
    summed over the tensor group (under FSDP over the data group first)."""
    run_dir = tmp_path / "run"
    extra = LAMB if optimizer == "lamb" else ()
    launch_ok(4, _overrides(run_dir, *extra, FAIRSCALE, f"parallel.zero_stage={stage}", "parallel.tensor=2"),
              script=FSDP_ON_CPU if stage == 3 else None)
    reference = lamb_reference if optimizer == "lamb" else causal_reference
    assert_same_curve(reference, run_dir, rel=1e-5, steps=10 if optimizer == "lamb" else 20)


@pytest.mark.launches
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
              f"at DP=2, {single} at DP=1; formula {memory['formula']['optimizer']}")


@pytest.mark.launches
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_is_exact(tmp_path, stage):
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, FAIRSCALE, f"parallel.zero_stage={stage}", "checkpoint.every=10",
                      "train.eval_every=10", "model.dropout=0.1")
    assert_resume_is_exact(2, args, run_dir)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """20 steps of fairscale's FSDP on 2 CPU ranks (the DP_LAYOUT config: 2 micro-batches per rank)."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    launch_ok(2, _overrides(run_dir, *FSDP), script=FSDP_ON_CPU)
    return run_dir


@pytest.mark.launches
def test_fully_sharded_equals_one_device_and_deepspeed_zero3(causal_reference, deepspeed_zero_runs, fsdp_run):
    """FSDP (every block its own unit, tied embeddings in the root unit, gradients reduce-scattered and
    accumulated as shards): 20 steps within 1e-5 of one process and of DeepSpeed's ZeRO-3 step by step."""
    assert_same_curve(causal_reference, fsdp_run, rel=1e-5)
    assert_same_curve(deepspeed_zero_runs[3][0], fsdp_run, rel=1e-5)
    engine = json.loads((fsdp_run / "engine_config.json").read_text())
    assert engine["parameter_sharding"] == engine["gradient_sharding"] == "FullyShardedDataParallel"


@pytest.mark.launches
def test_fully_sharded_memory_is_the_zero3_formula(fsdp_run):
    """Each rank keeps half of every parameter (rounded up per tensor: torch.chunk's split) and the optimizer
    state of that half: 4Ψ/2 and 8Ψ/2 bytes within 1%."""
    memory = json.loads((fsdp_run / "memory.json").read_text())
    assert memory["engine"] == "fairscale" and memory["zero_stage"] == 3 and memory["n_params"] == 27392
    for rank in memory["ranks"]:
        assert rank["params"] == pytest.approx(4 * 27392 / 2, rel=0.01), memory
        assert rank["optimizer"] == pytest.approx(memory["formula"]["optimizer"], rel=0.01), memory
    print(f"\nFSDP at DP=2: parameter bytes per rank {[r['params'] for r in memory['ranks']]}, optimizer bytes "
          f"{[r['optimizer'] for r in memory['ranks']]}; formula {memory['formula']}")


@pytest.mark.launches
def test_fully_sharded_tensor_parallel_sequence_parallel_recomputed(causal_reference, tmp_path):
    """TP=2 x DP=2 (4 ranks) with sequence parallelism and full activation checkpointing: FSDP shards each
    tensor shard over the data group, blocks are recomputed with their gathered parameters; the sample at the
    end runs through the root unit."""
    run_dir = tmp_path / "run"
    out = launch_ok(4, _overrides(run_dir, *FSDP, "parallel.tensor=2", "parallel.sequence_parallel=true",
                                  "parallel.activation_checkpointing=full", "train.sample_tokens=8"),
                    script=FSDP_ON_CPU)
    assert_same_curve(causal_reference, run_dir, rel=1e-5)
    assert "--- sample (8 tokens" in out
    # each tensor rank's parameters from its data ranks' flat shards, then the tensor shards merged
    assert consolidated_eval_loss(run_dir) == pytest.approx(read_metrics(run_dir)[1][20]["eval_loss"], rel=1e-6)


MODERN = ("model.norm_position=pre", "model.norm=rmsnorm", "model.positions=rotary", "model.activation=swiglu",
          "model.n_kv_heads=2", "model.bias=false", "model.tie_embeddings=false")
RELATIVE = ("model.norm_position=pre", "model.norm=rmsnorm", "model.positions=relative", "model.relative_buckets=8",
            "model.relative_max_distance=16", "model.bias=false")


@pytest.mark.launches
@pytest.mark.parametrize("family, options", [("seq2seq", RELATIVE), ("causal", MODERN)],
                         ids=["seq2seq-relative", "causal-rotary-swiglu-gqa-untied"])
def test_fully_sharded_other_models(one_device, tmp_path, family, options):
    """Under FSDP, the encoder-decoder (two block stacks, each block its own unit; cross-attention to the
    encoder's output; the relative position bias in the root unit) and the Llama-style decoder (rotary
    buffers, grouped-query attention, an untied head): loss, grad_norm and the final eval within 1e-5 of one
    process."""
    ref_dir, run_dir = one_device(family, *DP_LAYOUT, *options), tmp_path / "run"
    launch_ok(2, tiny_overrides(run_dir, family, *DP_LAYOUT, *options, *FSDP), script=FSDP_ON_CPU)
    assert_same_curve(ref_dir, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_fully_sharded_bf16_is_deepspeeds_bf16_zero3(tmp_path):
    """bf16 under FSDP is fairscale's mixed precision (fp32 master shards; parameters gathered and computed in
    bf16; gradients reduce-scattered in fp32; position tables fp32), as DeepSpeed's bf16 ZeRO-3 keeps bf16
    weights over fp32 masters: at step 1 (same weights, only rounding differs) loss and grad_norm within 1e-3 of
    DeepSpeed's, over 10 steps within 2e-3 / 2e-2 (measured: 4.8e-5 / 1.9e-3; `pytest -s` prints them). A
    wrong gradient is far off both."""
    ds_dir, fs_dir = tmp_path / "deepspeed", tmp_path / "fsdp"
    common = (*DP_LAYOUT, "train.precision=bf16", "train.steps=10")
    launch_ok(2, _overrides(ds_dir, *common, "parallel.zero_stage=3"))
    launch_ok(2, _overrides(fs_dir, *common, *FSDP), script=FSDP_ON_CPU)
    ds, fs = read_metrics(ds_dir)[0], read_metrics(fs_dir)[0]
    assert sorted(ds) == sorted(fs) == list(range(1, 11))
    for key, tol in (("loss", 2e-3), ("grad_norm", 2e-2)):
        assert fs[1][key] == pytest.approx(ds[1][key], rel=1e-3)
        worst = max(abs(fs[s][key] - ds[s][key]) / abs(ds[s][key]) for s in ds)
        print(f"\nbf16 FSDP vs DeepSpeed ZeRO-3, 10 steps: {key} {worst:.1e}")
        assert worst <= tol


@pytest.mark.launches
@pytest.mark.parametrize("which", ["fairscale1", "fairscale2", "fsdp"])
def test_consolidate_reads_the_engines_own_files(runs, fsdp_run, which):
    """`bigtrain consolidate`: the layout-free form's weights equal, bitwise, those the engine's own files
    reassemble to (data rank 0's model under OSS; every data rank's flat shards under FSDP), and one device
    evaluates them to the run's final eval loss."""
    run_dir = fsdp_run if which == "fsdp" else runs[which]
    assert consolidated_eval_loss(run_dir) == pytest.approx(read_metrics(run_dir)[1][20]["eval_loss"], rel=1e-6)


@pytest.mark.launches
def test_fully_sharded_resume_is_exact(tmp_path):
    """Each rank's parameter and optimizer shards, its RNG: steps 11-20 after a resume equal the straight run."""
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, *FSDP, "checkpoint.every=10", "train.eval_every=10", "model.dropout=0.1")
    assert_resume_is_exact(2, args, run_dir, script=FSDP_ON_CPU)


@pytest.mark.launches
def test_fully_sharded_refused_when_auto_lands_on_the_cpu(tmp_path):
    """train.device=auto passes the config check; on a machine without CUDA the engine refuses at start, on
    every rank, with the same one-paragraph message (no traceback, no hang)."""
    proc = launch_ranks(2, _overrides(tmp_path / "run", *FSDP))
    assert proc.returncode != 0
    for rank in (0, 1):
        assert (f"bigtrain: rank {rank}: error: parallel.engine=fairscale with parallel.zero_stage=3 means "
                f"fairscale's FullyShardedDataParallel, which fairscale runs on CUDA GPUs only; this run is on cpu"
                in proc.stderr), proc.stderr[-3000:]
    assert f"{REPO / 'bigtrain'}/" not in proc.stderr  # no traceback through bigtrain's package


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.zero_stage=0"], "set parallel.zero_stage to 1 (OSS)"),
    (["parallel.zero_stage=1", "parallel.pipeline=2"], "has no pipeline schedule"),
    (["parallel.zero_stage=1", "train.precision=fp16"], "train.precision=fp16 would need"),
    (["parallel.zero_stage=3", "train.device=cpu"], "runs on CUDA GPUs only"),
    (["parallel.zero_stage=2", "parallel.offload_optimizer=true"], "parallel.offload_optimizer=true is DeepSpeed's"),
    (["parallel.zero_stage=1", "deepspeed.steps_per_print=5"], "deepspeed: section is set"),
])
def test_refused_at_config_load(overrides, needle, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(None, _overrides(tmp_path / "run", FAIRSCALE, *overrides), world_size=4)
    assert needle in str(error.value) and "\n" not in str(error.value)
