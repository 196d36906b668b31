"""Tensor parallelism on CPU (gloo): the split model computes what the unsplit model computes.

Module level (tests/helpers/tensor_parity.py, 2 ranks): init, logits, loss and every gradient of all three
families, with and without sequence parallelism; dropout streams. Training level (launch/train.py): 20-step
curves of TP=2, TP=2 × DP=2 under ZeRO-1/2, TP=2 with activation checkpointing and with sequence
parallelism, and LAMB, against the single-process run; exact resume; consolidation into one-device weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.distributed.rendezvous import free_port
from tests.conftest import (
    DP_LAYOUT,
    LAMB,
    REPO,
    assert_resume_is_exact,
    assert_same_curve,
    consolidated_eval_loss,
    launch_ok,
    run_launcher,
    tiny_overrides,
)

pytestmark = pytest.mark.launches

TOL = 1e-5


# --- module level -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict[tuple[str, bool], dict]:
    out = tmp_path_factory.mktemp("parity") / "results.jsonl"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={free_port()}", str(REPO / "tests" / "helpers" / "tensor_parity.py"),
                           str(out)], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {(r["case"], r.get("sequence_parallel", False)): r for r in records}


CASES = ["causal", "causal-modern-gqa", "masked", "seq2seq", "seq2seq-modern", "gpt2", "bert", "t5"]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("case", CASES)
def test_split_model_matches_unsplit(parity, case, sequence_parallel):
    """TP=2 vs TP=1 from the same seed: shards are exact slices of the unsplit init; logits, loss and every
    gradient (sharded ones gathered) within 1e-5 relative; predictions (a global argmax) identical.
    `causal-modern-gqa`: pre-RMSNorm, rotary, SwiGLU, 4 query / 2 key-value heads, untied, no biases."""
    r = parity[(case, sequence_parallel)]
    assert r["init_exact"]
    assert r["logits"] <= TOL and r["loss"] <= TOL
    assert r["predictions_equal"]
    worst = max(r["grads"], key=r["grads"].get)
    print(f"\nmeasured: logits {r['logits']:.1e}, loss {r['loss']:.1e}, worst gradient {r['grads'][worst]:.1e} "
          f"({worst}), grad_norm {r['grad_norm']:.1e}")
    assert r["grads"][worst] <= TOL, f"{worst}: {r['grads'][worst]}"
    assert len(r["grads"]) == r["n_params"] and r["n_sharded"] > 0
    assert r["grad_norm"] <= TOL and r["piece_norms"] <= TOL
    assert r["local_logits_width"] == 32  # vocabulary of 64 split in two: full logits never built
    # Sequence parallelism: the residual stream between sublayers holds half of the tokens.
    assert r["residual_tokens"] == r["input_tokens"] // (2 if sequence_parallel else 1)


def test_dropout_streams(parity):
    """Replicated regions draw the same mask on both ranks, and the same as the unsplit model (with dropout
    only there, TP=2 = TP=1); sharded regions (FFN hidden units) draw a different mask per rank at the
    configured rate; full activation checkpointing replays every mask (gradients bitwise equal)."""
    r = parity[("dropout", False)]
    assert r["embed_same_on_ranks"]
    assert r["replicated_like_unsplit"] <= TOL
    assert r["ffn_masks_differ"]
    assert 0.05 < r["ffn_drop_rate"] < 0.2
    assert r["checkpoint_replays"]


def test_parallel_modules_are_visible_and_copyable(parity):
    """`print(model)` of a TP=2 model (sequence parallelism; full or selective activation checkpointing) names
    the parallel classes; the state-dict names are the unsplit model's; a copy.deepcopy computes with its own
    weights (same output at first, no shared storage, the original unaffected by changes to the copy, gradients
    land in the copy only)."""
    r = parity[("structure", False)]
    encoder_decoder, modern = map(set, r["classes"])
    common = {"TensorParallelEmbedding", "VocabParallelEmbedding", "VocabParallelHead", "TensorParallelAttention",
              "ColumnParallelLinear", "RowParallelLinear", "TensorParallelFeedForward", "ShardedDropout",
              "ActivationCheckpoint"}
    assert common | {"SequenceParallelLayerNorm", "ShardedAttentionCore"} <= encoder_decoder, encoder_decoder
    assert common | {"SequenceParallelRMSNorm"} <= modern, modern
    assert "LayerNorm" not in encoder_decoder and "RMSNorm" not in modern  # every norm runs on sequence shards
    assert "recomputes Block in backward" in r["repr"][0]
    assert "(core): ActivationCheckpoint(recomputes ShardedAttentionCore in backward)" in r["repr"][1]
    print("\n" + r["repr"][1][:1500])
    assert r["names_equal"] == [True, True]
    for copied in r["copy"]:
        assert copied == {"same_at_first": True, "shares_storage": False, "original_unchanged": True,
                          "copy_changed": True, "grads_in_copy_only": True}


# --- training level ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks,extra,launcher", [
    (2, ["parallel.tensor=2"], "torchrun"),
    (4, ["parallel.tensor=2", "parallel.zero_stage=1"], "deepspeed"),
    (4, ["parallel.tensor=2", "parallel.zero_stage=2"], "torchrun"),
    (2, ["parallel.tensor=2", "parallel.activation_checkpointing=full"], "torchrun"),
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"], "torchrun"),
], ids=["tp2", "tp2-dp2-zero1", "tp2-dp2-zero2", "tp2-checkpointing", "tp2-sequence-parallel"])
def test_training_matches_single_device(causal_reference, tmp_path, ranks, extra, launcher):
    """20 steps of `loss` and `grad_norm` within 1e-5 of the single-process run (grad_norm is the whole
    model's: sharded parameters summed over the tensor group, replicated ones counted once), and the final
    eval_loss (vocabulary-parallel loss over the same held-out sequences) within 1e-5."""
    run_dir = tmp_path / "run"
    out = launch_ok(ranks, tiny_overrides(run_dir, "causal", *DP_LAYOUT, *extra), launcher=launcher)
    assert f"tensor 2 × pipeline 1 × data {ranks // 2}" in out
    assert_same_curve(causal_reference, run_dir, TOL, eval_rel=TOL)


def test_seq2seq_sequence_parallel_matches_single_device(one_device, tmp_path):
    """Encoder-decoder with padded, variable-length batches: sequence parallelism pads them to a multiple
    of the tensor size (padding is masked and ignored by the loss), so the curve is unchanged."""
    ref_dir, run_dir = one_device("seq2seq", *DP_LAYOUT), tmp_path / "run"
    launch_ok(2, tiny_overrides(run_dir, "seq2seq", *DP_LAYOUT, "parallel.tensor=2", "parallel.sequence_parallel=true"))
    assert_same_curve(ref_dir, run_dir, TOL)


def test_lamb_exact_under_tensor_and_zero1(lamb_reference, tmp_path):
    """LAMB's per-tensor trust ratios over tensor shards and ZeRO partitions at once (TP=2 × DP=2, ZeRO-1):
    10 steps within 1e-5 of single-process LAMB (tests/test_zero_lamb.py: a per-shard ratio is off by > 1e-3)."""
    run_dir = tmp_path / "run"
    launch_ok(4, tiny_overrides(run_dir, "causal", *DP_LAYOUT, *LAMB, "parallel.tensor=2", "parallel.zero_stage=1"))
    assert_same_curve(lamb_reference, run_dir, TOL, steps=10)


def test_resume_with_tensor_parallelism_and_consolidate(tmp_path):
    """TP=2 with sequence parallelism and dropout 0.1 (per-rank streams in sharded regions): 10 steps, resume
    from the step-10 checkpoint, 10 more == 20 straight steps, bitwise. The checkpoint's shards consolidate
    into one-device weights with the run's final eval loss; data parallelism then goes on from the layout-free
    form."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, "causal", *DP_LAYOUT, "parallel.tensor=2", "parallel.sequence_parallel=true",
                          "checkpoint.every=10", "train.eval_every=10", "model.dropout=0.1")
    evals = assert_resume_is_exact(2, args, run_dir)
    assert consolidated_eval_loss(run_dir) == pytest.approx(evals[20]["eval_loss"], rel=1e-6)

    # The same run.dir under data parallelism instead: resumed from the layout-free form.
    out = launch_ok(2, [*args, "parallel.tensor=1", "parallel.sequence_parallel=false", "train.steps=30"])
    assert "resuming step 20 written by tensor 2 + sequence parallel × pipeline 1 × data 1" in out


def test_layout_that_does_not_divide_fails_before_work(tmp_path):
    """12 heads on tensor size 5: one clear line naming both numbers, exit 2, nothing trained."""
    proc = run_launcher(tiny_overrides(tmp_path / "run", "causal", "parallel.tensor=5", "model.n_heads=12",
                                       "model.d_model=48"))
    assert proc.returncode == 2
    assert "model.n_heads=12 is not divisible by parallel.tensor=5" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
