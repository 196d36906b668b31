"""torch.distributed.pipelining's schedules as an engine (issue 27, item 2: parallel.engine=torch with
parallel.pipeline > 1, `TorchPipelineEngine`) on CPU ranks over gloo, fp32, dropout 0, tolerance 1e-5: 20 steps
equal to one device (loss, grad_norm, the final eval) under interleaved 1F1B (V=2: 4 stages on 2 ranks), zero
bubble, DualPipeV, PP2 x TP2 with sequence parallelism, PP2 x DP2 (1F1B, data replicas), the encoder-decoder and
LAMB; an exact resume from its own files; consolidation. The step's micro-batches, padded and stacked for the
schedule, give the loss and gradients of the micro-batches one by one (fast). Resuming between DeepSpeed's 1F1B
pipeline and torch's interleaved schedule is in tests/test_layout_change.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.config.layout import resolve_layout
from bigtrain.errors import ConfigError
from bigtrain.models import build_model
from bigtrain.models.loss import IGNORE_INDEX, cross_entropy_sum, model_inputs
from bigtrain.parallel.pipeline_batches import fill_eval_batches, stack_micro_batches
from tests.conftest import (
    DP_LAYOUT,
    LAMB,
    assert_resume_is_exact,
    assert_same_curve,
    consolidated_eval_loss,
    launch_ok,
    read_metrics,
    tiny_overrides,
)

TORCH = "parallel.engine=torch"
PP2 = (TORCH, "parallel.pipeline=2")
INTERLEAVED = (*PP2, "parallel.pipeline_schedule=interleaved_1f1b", "parallel.virtual_stages=2")


def _overrides(run_dir: Path, *extra: str, family: str = "causal") -> list[str]:
    return tiny_overrides(run_dir, family, *DP_LAYOUT, *extra)


# ---- fast: the engine the layout names, refusals, the stacked batch ---------------------------------------------
def test_torch_with_stages_is_the_torch_pipeline_engine(tmp_path):
    cfg = load_config(None, _overrides(tmp_path / "run", *INTERLEAVED), world_size=2)
    layout = resolve_layout(cfg, 2)
    assert (layout.engine, layout.pipeline, layout.zero_stage) == ("torch_pipeline", 2, 0)


@pytest.mark.parametrize("extra, needle", [
    (("parallel.zero_stage=1",), "parallel.zero_stage=1 (optimizer state alone sharded) has no FSDP2 form, got 1"),
    (("parallel.zero_stage=3", "parallel.pipeline_schedule=dualpipev"),
     "parallel.pipeline_schedule='dualpipev' with parallel.zero_stage=3 is refused"),
])
def test_unservable_sharded_stages_are_refused_naming_the_key(tmp_path, extra, needle):
    with pytest.raises(ConfigError) as error:
        load_config(None, _overrides(tmp_path / "run", *INTERLEAVED, *extra), world_size=4)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_fsdp2_stages_are_accepted(tmp_path):
    cfg = load_config(None, _overrides(tmp_path / "run", *INTERLEAVED, "parallel.zero_stage=3"), world_size=4)
    layout = resolve_layout(cfg, 4)
    assert (layout.engine, layout.pipeline, layout.data, layout.zero_stage) == ("torch_pipeline", 2, 2, 3)


def test_a_parameter_in_two_stages_of_one_rank_is_refused():
    """One FSDP2 root per stage cannot hold a parameter two stages of the rank share (the tied embedding)."""
    from torch import nn

    from bigtrain.engine.torch_pipeline.sharding import check_tied_stages
    from bigtrain.parallel.stages import RankStages, StageModule

    shared, other = nn.Linear(2, 2), nn.Linear(2, 2)
    apart = RankStages([0, 3], [StageModule([shared], [None], 0), StageModule([other], [None], 4)], [], [], [0])
    check_tied_stages(apart)
    tied = RankStages([0, 3], [StageModule([shared], [None], 0), StageModule([shared], [None], 4)], [], [], [0])
    with pytest.raises(ConfigError, match="holds the tied embedding in stages 0 and 3"):
        check_tied_stages(tied)


def _micro_batches(family: str) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of different lengths, padded within each (as the loader pads them)."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for length in (7, 11):
        ids = torch.randint(0, 64, (2, length), generator=gen)
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1, length - 3:] = False
        labels = torch.randint(0, 64, (2, length), generator=gen).masked_fill(~mask, IGNORE_INDEX)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if family == "seq2seq":
            batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids.flip(1),
                     "decoder_attention_mask": mask, "labels": labels}
        out.append(batch)
    return out


@pytest.mark.parametrize("family", ["masked", "seq2seq"])
def test_stacked_micro_batches_give_the_loss_and_gradients_of_each(tmp_path, family):
    """Padding every micro-batch to the longest (masked keys, ignored targets) changes neither the summed loss nor
    the gradient: the stacked batch against the micro-batches one by one, within 1e-6."""
    cfg = load_config(None, _overrides(tmp_path / "run", family=family)).model
    model = build_model(cfg, 64, "cpu", seed=5)
    micro = _micro_batches(family)
    one_by_one = sum(cross_entropy_sum(model(**model_inputs(b)), b["labels"]) for b in micro)
    one_by_one.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    stacked = stack_micro_batches(micro)
    assert stacked["labels"].shape == (4, 11) and (stacked["labels"][:2, 7:] == IGNORE_INDEX).all()
    loss = cross_entropy_sum(model(**model_inputs(stacked)), stacked["labels"])
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(one_by_one.detach()), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_filled_evaluation_batches_add_nothing():
    batches = _micro_batches("masked")
    batches[1] = {k: v[:1] for k, v in batches[1].items()}  # a short last batch
    filled = fill_eval_batches(batches, 4)
    assert len(filled) == 4 and all(b["labels"].shape[0] == 2 for b in filled)
    targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in filled) == targets


# ---- launches: 20 steps against one device ----------------------------------------------------------------------
@pytest.mark.launches
def test_interleaved_equals_one_device_and_resumes_exactly(causal_reference, tmp_path):
    """PP2 x V=2 (stages 0, 2 on rank 0 and 1, 3 on rank 1): 20 steps and the final eval within 1e-5 of one
    process; rolled back to its step-10 checkpoint (its own files) it repeats steps 11-20 bitwise; the
    consolidated weights (layout-free form = own files) give the final eval."""
    run_dir = tmp_path / "run"
    args = _overrides(run_dir, *INTERLEAVED, "checkpoint.every=10")
    assert_resume_is_exact(2, args, run_dir)
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)
    engine = json.loads((run_dir / "engine_config.json").read_text())
    assert engine["engine"] == "torch_pipeline" and engine["schedule"] == "interleaved_1f1b"
    assert engine["virtual_stages"] == 2 and engine["micro_batches"] == 4
    assert consolidated_eval_loss(run_dir) == pytest.approx(read_metrics(run_dir)[1][20]["eval_loss"], rel=1e-6)


@pytest.mark.launches
@pytest.mark.parametrize("schedule", ["zero_bubble", "dualpipev"])
def test_zero_bubble_schedules_equal_one_device(causal_reference, tmp_path, schedule):
    """zero_bubble (interleaved, weight gradients deferred) and DualPipeV (V-shaped: rank 0 holds the first and
    the last stage, so the tied embedding's two uses share one parameter there); evaluation runs a forward-only
    schedule over the same placement."""
    run_dir = tmp_path / "run"
    launch_ok(2, _overrides(run_dir, *PP2, f"parallel.pipeline_schedule={schedule}", "parallel.virtual_stages=2"))
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_tensor_parallel_stages(causal_reference, tmp_path):
    """PP2 x TP2 (4 ranks) interleaved, with sequence parallelism: each stage's layers are tensor-parallel, the
    loss vocabulary-parallel, the norm summed over tensor x pipeline with replicated parameters once; the
    sequence shards cross stage boundaries (both ways) as contiguous tensors."""
    run_dir = tmp_path / "run"
    launch_ok(4, _overrides(run_dir, *INTERLEAVED, "parallel.tensor=2", "parallel.sequence_parallel=true"))
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_data_parallel_replicas_of_the_pipeline(causal_reference, tmp_path):
    """PP2 x DP2 (4 ranks) under 1F1B: each pipeline runs its data rank's 2 micro-batches, whose losses are
    divided by the whole global batch's target count; the replicas sum their gradients."""
    run_dir = tmp_path / "run"
    launch_ok(4, _overrides(run_dir, *PP2, "parallel.data=2", "parallel.pipeline_schedule=1f1b"))
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_encoder_decoder_interleaved(one_device, tmp_path):
    """The encoder-decoder (padded batches of varying length) cut into 4 stages: the encoder's output travels
    with the decoder's inputs; the embedding is used on the first stage and by the decoder and the tied head."""
    ref, run_dir = one_device("seq2seq", *DP_LAYOUT), tmp_path / "run"
    launch_ok(2, _overrides(run_dir, *INTERLEAVED, family="seq2seq"))
    assert_same_curve(ref, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_lamb_interleaved(lamb_reference, tmp_path):
    """LAMB's per-parameter norms are whole on each stage: 10 steps within 1e-5 of one device."""
    run_dir = tmp_path / "run"
    launch_ok(2, _overrides(run_dir, *LAMB, *INTERLEAVED))
    assert_same_curve(lamb_reference, run_dir, rel=1e-5, steps=10)


@pytest.mark.launches
def test_recomputed_and_compiled_stages(causal_reference, tmp_path):
    """Activation checkpointing and train.compile act on the blocks before the stages are cut, so the stages run
    recomputed, compiled blocks: interleaved 1F1B within 1e-5 of eager one device."""
    run_dir = tmp_path / "run"
    launch_ok(2, _overrides(run_dir, *INTERLEAVED, "parallel.activation_checkpointing=full", "train.compile=true"))
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_fsdp2_stages_3d_equal_one_device_and_resume_across_zero_stages(causal_reference, tmp_path):
    """PP2 x FSDP2 DP2 (4 ranks), interleaved V=2, zero_stage 3: each stage sharded over the data group, gradients
    reduce-scattered once per step: 20 steps and the final eval within 1e-5 of one process; each rank's parameter
    bytes 4Ψ_stage/D (1%). Rolled back to step 10 and resumed at zero_stage 2 under zero_bubble (another layout,
    so through the layout-free form into the sharded stages; weight gradients deferred to W actions): steps 11-20
    within 1e-5 again, and the consolidated weights of the zero_stage-2 files equal the layout-free form's and
    give the final eval."""
    run_dir = tmp_path / "run"
    base = _overrides(run_dir, *INTERLEAVED, "parallel.data=2", "checkpoint.every=10")
    launch_ok(4, [*base, "parallel.zero_stage=3"])
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)
    engine = json.loads((run_dir / "engine_config.json").read_text())
    assert (engine["zero_stage"], engine["reshard_after_forward"], engine["data_parallel_size"]) == (3, True, 2)
    memory = json.loads((run_dir / "memory.json").read_text())
    assert memory["engine"] == "torch_pipeline" and len(memory["ranks"]) == 4
    for psi, rank in zip(memory["stage_params"], memory["ranks"], strict=True):
        assert rank["params"] == pytest.approx(4 * psi / 2, rel=0.01), memory
        assert rank["grads"] == pytest.approx(4 * psi / 2, rel=0.01), memory
    print(f"\nPP2 x FSDP2 DP2 ZeRO-3: parameter bytes per rank {[r['params'] for r in memory['ranks']]}, "
          f"4Ψ_stage/D = {[4 * p // 2 for p in memory['stage_params']]}")
    ckpt = run_dir / "checkpoints"
    shutil.rmtree(ckpt / "step_00000020")
    (ckpt / "latest").write_text("step_00000010\n")
    out = launch_ok(4, [*base, "parallel.zero_stage=2", "parallel.pipeline_schedule=zero_bubble"])
    assert "resumed from" in out and "(step 10)" in out
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)
    resumed = json.loads((run_dir / "engine_config.json").read_text())
    assert (resumed["schedule"], resumed["zero_stage"], resumed["reshard_after_forward"]) == ("zero_bubble", 2, False)
    assert consolidated_eval_loss(run_dir) == pytest.approx(read_metrics(run_dir)[1][20]["eval_loss"], rel=1e-6)
