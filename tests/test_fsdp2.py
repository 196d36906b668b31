"""PyTorch's FSDP2 engine (issue 27, item 1: parallel.engine=torch on several ranks) on CPU ranks over gloo, fp32,
dropout 0, tolerance 1e-5: at zero_stage 2 and 3 equal to one device over 20 steps (loss, grad_norm, the final
eval), also TP=2 x DP=2 with sequence parallelism and activation checkpointing, and the other model families;
LAMB exact; bf16 within rounding; parameter bytes per rank 4Ψ/D; exact resume from its own files;
consolidation; a non-finite step skipped on every rank. Moving a run between FSDP2 and DeepSpeed is in
tests/test_layout_change.py, train.compile in tests/test_compile.py; refusals and the engine `torch` resolves to
are checked at config load here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigtrain.compat.fsdp2 import row_range
from bigtrain.config import load_config
from bigtrain.config.layout import resolve_layout
from bigtrain.errors import ConfigError
from bigtrain.models import build_model, count_parameters
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

TORCH = "parallel.engine=torch"


def _overrides(run_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(run_dir, "causal", *DP_LAYOUT, *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """20 steps of FSDP2 at zero_stage 2 and 3 on 2 ranks (the DP_LAYOUT config: 2 micro-batches per rank)."""
    out = {}
    for stage in (2, 3):
        run_dir = tmp_path_factory.mktemp(f"fsdp2-{stage}") / "run"
        launch_ok(2, _overrides(run_dir, TORCH, f"parallel.zero_stage={stage}"))
        out[stage] = run_dir
    return out


@pytest.mark.launches
@pytest.mark.parametrize("stage", [2, 3])
def test_equals_one_device(causal_reference, runs, stage):
    """zero_stage 2 (parameters kept gathered from forward to backward) and 3 (gathered again for backward):
    loss and grad_norm of 20 steps and the final eval_loss within 1e-5 of one process."""
    assert_same_curve(causal_reference, runs[stage], rel=1e-5, eval_rel=1e-5)
    engine = json.loads((runs[stage] / "engine_config.json").read_text())
    assert engine["engine"] == "fsdp2" and engine["zero_stage"] == stage
    assert engine["reshard_after_forward"] == (stage == 3) and engine["data_parallel_size"] == 2


@pytest.mark.launches
def test_parameter_bytes_are_four_psi_over_d(runs):
    """Each rank keeps its rows of every parameter (FSDP2's sharded storage measured) and the optimizer state of
    them: 4Ψ/2 and 8Ψ/2 bytes within 1%."""
    for stage, run_dir in runs.items():
        memory = json.loads((run_dir / "memory.json").read_text())
        assert memory["engine"] == "fsdp2" and memory["zero_stage"] == stage and memory["n_params"] == 27392
        for rank in memory["ranks"]:
            assert rank["params"] == pytest.approx(4 * 27392 / 2, rel=0.01), memory
            assert rank["optimizer"] == pytest.approx(8 * 27392 / 2, rel=0.01), memory
        print(f"\nFSDP2 ZeRO-{stage} at DP=2: parameter bytes per rank {[r['params'] for r in memory['ranks']]}, "
              f"optimizer bytes {[r['optimizer'] for r in memory['ranks']]}; 4Ψ/D = {4 * 27392 // 2}")


@pytest.mark.parametrize("data", [2, 4])
def test_rows_per_rank_add_up_to_a_dth_of_the_model(tmp_path, data):
    """FSDP2's split of dimension 0 (torch.chunk's: ⌈n/D⌉ rows from r·⌈n/D⌉) over the tiny model's parameters:
    the ranks' values add up to Ψ, each rank's within 1% of Ψ/D (what the memory report measures). At D=3 the
    rounding up of 32-row tensors leaves ranks 2.4% apart."""
    cfg = load_config(None, _overrides(tmp_path / "run"))
    model = build_model(cfg.model, 256, "meta")
    n = count_parameters(model)
    per_rank = [sum(row_range(p.shape[0], r, data)[1] * p.shape[1:].numel() for p in model.parameters())
                for r in range(data)]
    assert sum(per_rank) == n
    for values in per_rank:
        assert values == pytest.approx(n / data, rel=0.01), (per_rank, n)


@pytest.mark.launches
@pytest.mark.parametrize("stage", [2, 3])
def test_lamb_is_exact(lamb_reference, tmp_path, stage):
    """Each rank holds rows of every parameter; LAMB's two norms of a parameter are its rows' squares summed over
    the data group: 10 steps within 1e-5 of one device."""
    run_dir = tmp_path / "run"
    launch_ok(2, _overrides(run_dir, *LAMB, TORCH, f"parallel.zero_stage={stage}"))
    assert_same_curve(lamb_reference, run_dir, rel=1e-5, steps=10)


@pytest.mark.launches
def test_tensor_parallel_sequence_parallel_recomputed(causal_reference, tmp_path):
    """TP=2 x DP=2 (4 ranks) with sequence parallelism and full activation checkpointing: FSDP2 shards each
    tensor shard over the data group, blocks are recomputed with their gathered parameters, norms count
    replicated parameters once; the sample at the end runs through the root unit, and consolidation puts each
    tensor rank's rows together before merging the tensor shards."""
    run_dir = tmp_path / "run"
    out = launch_ok(4, _overrides(run_dir, TORCH, "parallel.zero_stage=3", "parallel.tensor=2",
                                  "parallel.sequence_parallel=true", "parallel.activation_checkpointing=full",
                                  "train.sample_tokens=8", "checkpoint.every=20"))
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)
    assert "--- sample (8 tokens" in out
    assert consolidated_eval_loss(run_dir) == pytest.approx(read_metrics(run_dir)[1][20]["eval_loss"], rel=1e-6)


@pytest.mark.launches
def test_tensor_parallel_lamb(lamb_reference, tmp_path):
    """TP=2 x DP=2, LAMB at zero_stage 2: a tensor shard's norms summed over the data group, then the tensor
    group (replicated parameters once)."""
    run_dir = tmp_path / "run"
    launch_ok(4, _overrides(run_dir, *LAMB, TORCH, "parallel.zero_stage=2", "parallel.tensor=2"))
    assert_same_curve(lamb_reference, run_dir, rel=1e-5, steps=10)


MODERN = ("model.norm_position=pre", "model.norm=rmsnorm", "model.positions=rotary", "model.activation=swiglu",
          "model.n_kv_heads=2", "model.bias=false", "model.tie_embeddings=false")
RELATIVE = ("model.norm_position=pre", "model.norm=rmsnorm", "model.positions=relative", "model.relative_buckets=8",
            "model.relative_max_distance=16", "model.bias=false")


@pytest.mark.launches
@pytest.mark.parametrize("family, options, stage", [("seq2seq", RELATIVE, 3), ("causal", MODERN, 2)],
                         ids=["seq2seq-relative-zero3", "causal-rotary-swiglu-gqa-untied-zero2"])
def test_other_models(one_device, tmp_path, family, options, stage):
    """The encoder-decoder (two block stacks, each block its own unit; the relative position bias in the root
    unit; greedy decoding for the sequence accuracy at the end) and the Llama-style decoder (rotary buffers,
    grouped-query attention, an untied head): loss, grad_norm and the final eval within 1e-5 of one process."""
    ref_dir, run_dir = one_device(family, *DP_LAYOUT, *options), tmp_path / "run"
    launch_ok(2, tiny_overrides(run_dir, family, *DP_LAYOUT, *options, TORCH, f"parallel.zero_stage={stage}"))
    assert_same_curve(ref_dir, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_bf16_mixed_precision_over_fp32_master_shards(causal_reference, tmp_path):
    """bf16 is FSDP2's MixedPrecisionPolicy (parameters gathered and computed in bf16, gradients reduced in fp32)
    over fp32 master shards: the shards stay 4 bytes a value (4Ψ/2 per rank), and the 20 steps stay within
    rounding of fp32 one device (asserted 2e-3 in loss, 2e-2 in grad_norm; measured 4.4e-4 / 4.6e-3, as close as
    DeepSpeed's bf16 ZeRO-3 on the same config, 4.6e-4 / 4.1e-3). A wrong gradient is far off both."""
    run_dir = tmp_path / "run"
    launch_ok(2, _overrides(run_dir, TORCH, "parallel.zero_stage=3", "train.precision=bf16"))
    ref, run = read_metrics(causal_reference)[0], read_metrics(run_dir)[0]
    assert sorted(run) == sorted(ref) == list(range(1, 21))
    for key, tol in (("loss", 2e-3), ("grad_norm", 2e-2)):
        worst = max(abs(run[s][key] - ref[s][key]) / abs(ref[s][key]) for s in ref)
        print(f"\nFSDP2 bf16 vs fp32 one device, 20 steps: {key} {worst:.1e}")
        assert worst <= tol
    memory = json.loads((run_dir / "memory.json").read_text())
    assert all(rank["params"] == 4 * 27392 // 2 for rank in memory["ranks"]), memory


@pytest.mark.launches
def test_resume_is_exact(tmp_path):
    """Each rank's rows and optimizer state (fsdp2_rankNNNNN.pt), its RNG: steps 11-20 after a resume equal the
    straight run, bitwise."""
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, TORCH, "parallel.zero_stage=3", "checkpoint.every=10", "train.eval_every=10",
                      "model.dropout=0.1")
    assert_resume_is_exact(2, args, run_dir)
    assert (run_dir / "checkpoints" / "step_00000020" / "fsdp2_rank00001.pt").is_file()
    assert consolidated_eval_loss(run_dir) == pytest.approx(read_metrics(run_dir)[1][20]["eval_loss"], rel=1e-6)


@pytest.mark.launches
def test_nonfinite_step_is_skipped_on_every_rank(tmp_path):
    """NaN on rank 1 in step 3 with on_nonfinite=skip (tests/helpers/inject.py): every rank skips the update on
    the device; each rank's own files of steps 2 and 3 (its rows and optimizer state) are bitwise equal; step 4
    updates again."""
    run_dir = tmp_path / "run"
    proc = launch_ranks(2, _overrides(run_dir, TORCH, "parallel.zero_stage=3", "train.steps=5",
                                      "train.on_nonfinite=skip", "checkpoint.every=1", "checkpoint.keep=10"),
                        script=REPO / "tests" / "helpers" / "inject.py",
                        env={"BIGTRAIN_TEST_RANK": "1", "BIGTRAIN_TEST_NAN_STEPS": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update skipped, weights and optimizer state unchanged (1 in a row)" in proc.stdout
    lines = read_metrics(run_dir)[0]
    assert lines[3]["skipped"] is True and lines[4]["skipped"] is False
    for rank in (0, 1):
        before, after, later = (torch.load(run_dir / "checkpoints" / f"step_0000000{s}" / f"fsdp2_rank0000{rank}.pt",
                                           weights_only=True) for s in (2, 3, 4))
        assert all(torch.equal(v, after["model"][k]) for k, v in before["model"].items())
        assert before["optimizer"]["state"].keys() == after["optimizer"]["state"].keys()
        for index, state in before["optimizer"]["state"].items():
            assert all(torch.equal(v, after["optimizer"]["state"][index][k]) for k, v in state.items())
        assert not all(torch.equal(v, later["model"][k]) for k, v in after["model"].items())


@pytest.mark.parametrize("world, extra, engine, stage", [
    (1, (), "torch", 0),
    (2, ("parallel.zero_stage=2",), "fsdp2", 2),
    (4, ("parallel.zero_stage=3", "parallel.tensor=2"), "fsdp2", 3),
])
def test_torch_resolves_to_the_plain_engine_or_fsdp2(tmp_path, world, extra, engine, stage):
    layout = resolve_layout(load_config(None, _overrides(tmp_path / "run", TORCH, *extra), world_size=world), world)
    assert (layout.engine, layout.zero_stage) == (engine, stage)


def test_auto_is_unchanged(tmp_path):
    """parallel.engine=auto still means DeepSpeed on several ranks."""
    for stage in (0, 3):
        cfg = load_config(None, _overrides(tmp_path / "run", f"parallel.zero_stage={stage}"), world_size=2)
        assert resolve_layout(cfg, 2).engine == "deepspeed"


@pytest.mark.parametrize("world, overrides, needle", [
    (2, ["parallel.zero_stage=0"], "set parallel.zero_stage to 2 (parameters kept gathered from forward to backward) "
                                   "or 3"),
    (2, ["parallel.zero_stage=1"], "not 1; for ZeRO-0 or ZeRO-1 use parallel.engine=auto"),
    (4, ["parallel.zero_stage=1", "parallel.pipeline=2"], "parallel.zero_stage=1 (optimizer state alone sharded) "
                                                          "has no FSDP2 form, got 1"),
    (2, ["parallel.zero_stage=3", "train.precision=fp16"], "train.precision=fp16 would need a sharded loss scaler"),
    (2, ["parallel.zero_stage=2", "parallel.offload_optimizer=true"], "parallel.offload_optimizer=true is DeepSpeed's"),
    (2, ["parallel.zero_stage=3", "deepspeed.steps_per_print=5"], "its engine is PyTorch's FSDP2"),
    (1, ["parallel.zero_stage=3"], "parallel.zero_stage must be 0 there, got 3"),
])
def test_refused_at_config_load(tmp_path, world, overrides, needle):
    with pytest.raises(ConfigError) as error:
        load_config(None, _overrides(tmp_path / "run", TORCH, *overrides), world_size=world)
    assert needle in str(error.value) and "\n" not in str(error.value)
