"""Context parallelism in training (issue 28): every rank of a context group runs its zig-zag share of every
sequence with global positions, attention exact over the whole sequence (ring or Ulysses), the loss the global
batch's mean and gradients summed over data × context. CPU ranks over gloo, fp32, dropout 0: 20 steps of loss
and grad_norm, and the final evaluation, within 1e-5 of one process (`pytest -s` prints the largest relative
differences measured)."""

from __future__ import annotations

import pytest

from tests.conftest import (
    BERT_OPTIONS,
    DP_LAYOUT,
    LAMB,
    T5_OPTIONS,
    assert_resume_is_exact,
    assert_same_curve,
    consolidated_eval_loss,
    launch_ok,
    read_metrics,
    tiny_overrides,
)

CP2 = ("parallel.context=2",)
MODERN = ("model.norm_position=pre", "model.norm=rmsnorm", "model.positions=rotary", "model.activation=swiglu",
          "model.n_kv_heads=2", "model.bias=false", "model.tie_embeddings=false")


def _run(tmp_path, ranks: int, family: str, *extra: str):
    """Train at CP2 on `ranks` ranks; the run says its layout has a context dimension of 2."""
    run_dir = tmp_path / "run"
    out = launch_ok(ranks, tiny_overrides(run_dir, family, *DP_LAYOUT, *CP2, *extra))
    assert "context 2 × " in out, out[-2000:]
    return run_dir


@pytest.mark.launches
@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_context_two_equals_one_device(causal_reference, tmp_path, attention):
    """CP2 (2 ranks, DeepSpeed ZeRO-0, sinusoidal positions, tied embeddings): each rank holds chunks i and 3-i
    of every sequence; ring attention and DeepSpeed-Ulysses. The sample at the end runs the whole model on each
    rank (the cores attend plainly outside a training micro-batch). The checkpoint consolidates to one device's
    weights, which give the run's final eval loss."""
    run_dir = tmp_path / "run"
    out = launch_ok(2, tiny_overrides(run_dir, "causal", *DP_LAYOUT, *CP2, f"parallel.context_attention={attention}",
                                      "train.sample_tokens=8", "checkpoint.every=20"))
    assert "context 2 × " in out and "--- sample (8 tokens" in out, out[-2000:]
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)
    assert consolidated_eval_loss(run_dir) == pytest.approx(read_metrics(run_dir)[1][20]["eval_loss"], rel=1e-6)


@pytest.mark.launches
def test_lamb_over_data_and_context(lamb_reference, tmp_path):
    """LAMB's per-tensor norms over ZeRO-1 partitions of the gradient group (CP2 × DP2): 10 steps within 1e-5."""
    run_dir = _run(tmp_path, 4, "causal", *LAMB, "parallel.zero_stage=1")
    assert_same_curve(lamb_reference, run_dir, rel=1e-5, steps=10)


@pytest.mark.launches
def test_context_with_data_parallel_zero1(causal_reference, tmp_path):
    """CP2 × DP2 under ZeRO-1 (4 ranks): gradients averaged and optimizer state partitioned over data × context,
    the target count over the data group only."""
    run_dir = _run(tmp_path, 4, "causal", "parallel.zero_stage=1")
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_context_rotary_gqa_fsdp2(one_device, tmp_path):
    """The Llama-style decoder (rotary on global positions, grouped-query attention, untied head) under FSDP2's
    mesh of data × context, ZeRO-2 (parallel.engine=torch)."""
    ref_dir = one_device("causal", *DP_LAYOUT, *MODERN)
    run_dir = _run(tmp_path, 2, "causal", *MODERN, "parallel.engine=torch", "parallel.zero_stage=2")
    assert_same_curve(ref_dir, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_seq2seq_context_two_with_tensor_sequence_parallel(one_device, tmp_path):
    """The encoder-decoder at CP2 × TP2 with sequence parallelism (4 ranks): encoder and decoder sequences both
    split (padded to a multiple of 2C·T), the cross-attention's keys and values gathered from every rank's share
    of the encoder. (CP2 alone: the T5-style runs of test_relative_position_bias.)"""
    ref_dir = one_device("seq2seq", *DP_LAYOUT)
    run_dir = _run(tmp_path, 4, "seq2seq", "parallel.tensor=2", "parallel.sequence_parallel=true")
    assert_same_curve(ref_dir, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_fsdp2_with_tensor_parallel(causal_reference, tmp_path):
    """FSDP2 ZeRO-3 at CP2 × TP2 (4 ranks): each tensor shard sharded over the gradient group of 2 context
    ranks."""
    run_dir = _run(tmp_path, 4, "causal", "parallel.engine=torch", "parallel.zero_stage=3", "parallel.tensor=2")
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)



@pytest.mark.launches
@pytest.mark.parametrize("family, attention", [("seq2seq", "ring"), ("seq2seq", "ulysses"), ("causal", "ring")],
                         ids=["t5-ring", "t5-ulysses", "causal-relative-ring"])
def test_relative_position_bias(one_device, tmp_path, family, attention):
    """T5's relative bias over global positions (the bias of the whole sequence, its table's gradient summed
    over the context ranks): the T5-style encoder-decoder with ring and Ulysses, a causal stack with ring."""
    ref_dir = one_device(family, *DP_LAYOUT, *T5_OPTIONS)
    run_dir = _run(tmp_path, 2, family, *T5_OPTIONS, f"parallel.context_attention={attention}")
    assert_same_curve(ref_dir, run_dir, rel=1e-5, eval_rel=1e-5)



DOCUMENTS = ("data.document_masking=true", "model.positions=rotary", "model.n_kv_heads=2")


@pytest.mark.launches
@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_document_masking_compiled(one_device, tmp_path, attention):
    """Packed documents crossing the chunk boundaries: each attends only within itself, positions restart per
    document (computed on the whole sequence, then split), grouped-query heads; with train.compile (each block
    compiled, the context-parallel core run eagerly inside it: a graph break): 10 steps within 1e-5 of one eager
    process."""
    ref_dir = one_device("causal", *DP_LAYOUT, *DOCUMENTS, "train.steps=10")
    run_dir = _run(tmp_path, 2, "causal", *DOCUMENTS, "train.steps=10", "train.compile=true",
                   f"parallel.context_attention={attention}")
    assert_same_curve(ref_dir, run_dir, rel=1e-5, steps=10, eval_rel=1e-5)


@pytest.mark.launches
def test_masked_lm(one_device, tmp_path):
    """The BERT-style encoder (bidirectional, learned positions, token types, padding masks) at CP2."""
    ref_dir = one_device("masked", *DP_LAYOUT, *BERT_OPTIONS)
    run_dir = _run(tmp_path, 2, "masked", *BERT_OPTIONS)
    assert_same_curve(ref_dir, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_tensor_sequence_parallel_and_checkpointing(causal_reference, tmp_path):
    """CP2 × TP2 with sequence parallelism (each rank's S/C tokens split again over the tensor group) and
    selective activation checkpointing (the ring recomputed in backward, from the same micro-batch's tokens)."""
    run_dir = _run(tmp_path, 4, "causal", "parallel.tensor=2", "parallel.sequence_parallel=true",
                   "parallel.activation_checkpointing=selective")
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)


@pytest.mark.launches
def test_resume_is_exact(tmp_path):
    """CP2 × DP2 under ZeRO-1 with residual dropout 0.1 (attention dropout 0): 10 steps, resume from DeepSpeed's
    own files, 10 more == 20 straight steps, bitwise."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, "causal", *DP_LAYOUT, *CP2, "parallel.zero_stage=1", "checkpoint.every=10",
                          "train.eval_every=10", "model.dropout=0.1", "model.attention_dropout=0")
    assert_resume_is_exact(4, args, run_dir)


RESUME_PAIRS = {
    "cp2->1-device": ((2, CP2), (1, ())),
    "dp2-zero1->cp2xdp2-zero1": ((2, ("parallel.zero_stage=1",)), (4, (*CP2, "parallel.zero_stage=1"))),
    "cp2-fsdp2-zero3->cp2-zero3": ((2, (*CP2, "parallel.engine=torch", "parallel.zero_stage=3")),
                                   (2, (*CP2, "parallel.zero_stage=3"))),
}


@pytest.mark.launches
@pytest.mark.parametrize("pair", list(RESUME_PAIRS))
def test_resume_into_and_out_of_context_parallelism(session_run, tmp_path, pair):
    """The layout-free checkpoint: 10 steps under layout A, 10 more under B equal 20 straight steps under A
    (within 1e-5), the same global samples step by step."""
    from tests.test_layout_change import PAIRS, test_resume_under_another_layout_continues_the_curve

    PAIRS[pair] = RESUME_PAIRS[pair]
    try:
        test_resume_under_another_layout_continues_the_curve(session_run, tmp_path, pair)
    finally:
        del PAIRS[pair]


TORCH_INTERLEAVED_ULYSSES = ("parallel.engine=torch", "parallel.pipeline_schedule=interleaved_1f1b",
                             "parallel.virtual_stages=2", "parallel.context_attention=ulysses",
                             "parallel.activation_checkpointing=full")


@pytest.mark.launches
def test_context_with_pipeline_stages(causal_reference, tmp_path):
    """CP2 × PP2 (4 ranks) on DeepSpeed's pipeline engine (1F1B over 4 micro-batches, ring): each stage's
    attention runs over its rank's context group, the activations between stages are the rank's zig-zag tokens
    and every stage rebuilds the micro-batch's global positions; 20 steps and the final evaluation within 1e-5 of
    one device. Its step-10 checkpoint then resumes (the layout-free form) on PyTorch's interleaved 1F1B schedule
    (2 stages per rank) with Ulysses and full activation checkpointing (a block recomputes with its own
    micro-batch's tokens while the schedule interleaves them): steps 11-20 within 1e-5 of the straight run, the
    same samples, and the final evaluation within 1e-5 of one device."""
    from tests.test_layout_change import _train, resume_at_ten_under

    run_dir = tmp_path / "run"
    out = _train(4, run_dir, (*CP2, "parallel.pipeline=2"))
    assert "context 2 × " in out and "pipeline 2" in out, out[-2000:]
    assert_same_curve(causal_reference, run_dir, rel=1e-5, eval_rel=1e-5)
    resume_at_ten_under(run_dir, 4, (*CP2, "parallel.pipeline=2", *TORCH_INTERLEAVED_ULYSSES),
                        "cp2xpp2-deepspeed->cp2xpp2-interleaved-torch-ulysses")
    final, reference = read_metrics(run_dir)[1][20]["eval_loss"], read_metrics(causal_reference)[1][20]["eval_loss"]
    print(f"resumed on PyTorch's schedule: final eval_loss relative difference {abs(final / reference - 1):.1e}")
    assert final == pytest.approx(reference, rel=1e-5)


@pytest.mark.launches
def test_parity_command_takes_the_context_keys(tmp_path):
    """`bigtrain parity --layout context=2,context_attention=ulysses --shrink` launches 2 ranks and passes (the
    shrunk model has 2C heads per tensor rank and sequences of 32·C tokens, so every split stays valid)."""
    from tests.test_parity_command import _parity

    proc = _parity(tmp_path, "--layout", "context=2,context_attention=ulysses")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "parity PASSED" in proc.stdout
    assert "parity: run 1 (layout context=2,context_attention=ulysses, 2 ranks): step 5 of 5" in proc.stderr


@pytest.mark.launches
def test_activation_bytes_per_rank_are_one_cth(tmp_path):
    """The activations a rank keeps for backward (SavedActivationMeter's peak over a micro-batch of 2 × 512
    tokens, attention's saved tensors included) at C = 2 and 4: within 10% of 1/C of one device's, ring and Ulysses
    (measured 1.033 / C for the ring at C = 2 and 4, 0.975 / C and 0.978 / C for Ulysses; the measurement is
    bench/long_context.py's `measure_rank`) (tests/helpers/context_memory.py)."""
    import json

    import torch.multiprocessing as mp

    from bigtrain.distributed.rendezvous import free_port
    from tests.helpers import context_memory

    peaks = {}
    for context in (1, 2, 4):
        out = tmp_path / f"c{context}.jsonl"
        mp.spawn(context_memory.main, args=(context, free_port(), str(out)), nprocs=context)
        for line in out.read_text().splitlines():
            r = json.loads(line)
            peaks[r["algorithm"], context] = r["peak"]
    ratios = {(a, c): peaks[a, c] * c / peaks[a, 1] for a in ("ring", "ulysses") for c in (2, 4)}
    for (algorithm, context), ratio in ratios.items():
        print(f"\nmeasured {algorithm} C={context}: {peaks[algorithm, context]} B per rank, one device "
              f"{peaks[algorithm, 1]} B: × C = {ratio:.3f} of one device's")
    assert all(abs(r - 1) <= 0.1 for r in ratios.values()), ratios
