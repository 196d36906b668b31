"""`bigtrain plan` with context parallelism (issue 28): activations per rank ÷ C, the ring's and Ulysses'
communication as formulas, the search's context sizes, the proposal of C > 1 for a sequence no C = 1 layout holds,
and the config's own C in the "as given" estimate."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bigtrain.config import load_config
from bigtrain.planning import accelerator, make_plan, model_shape
from bigtrain.planning.memory_model import Candidate, stage_memory
from bigtrain.planning.search import candidates, given_candidate, setting
from bigtrain.planning.splits import check_splits
from bigtrain.planning.time_model import Network, step_time
from tests.conftest import REPO, run_cli

GPT2 = REPO / "configs/gpt2-small.yaml"  # 12 blocks, d_model 768, 12 heads, sequence 1024, bf16


def _setting(cfg):
    return setting(cfg, on_gpu=True, framework_bytes=2**30)


def test_activations_per_rank_are_halved_at_c2():
    """Same layout (T, P, D, ZeRO, recomputation, micro-batch) with C = 2: every per-token term (saved
    activations, logits and their gradient, the recomputed block) is half of C = 1's; ZeRO-1's optimizer state is
    partitioned over D·C, like C = 1 with twice the data ranks."""
    cfg = load_config(GPT2)
    shape, s = model_shape(cfg), _setting(cfg)
    for ckpt, sp in (("none", False), ("selective", True), ("full", True)):
        one = Candidate(2, 1, 2, 1, ckpt, sp, 2)
        two = dataclasses.replace(one, context=2)
        m1, m2 = stage_memory(shape, one, s)[0], stage_memory(shape, two, s)[0]
        assert m2.activations == pytest.approx(m1.activations / 2, rel=1e-6), ckpt
        assert m2.transient == pytest.approx(m1.transient / 2, rel=1e-6), ckpt
        assert m2.parameters == m1.parameters and m2.gradients == m1.gradients
        wider = stage_memory(shape, dataclasses.replace(one, data=4), s)[0]
        assert m2.optimizer == wider.optimizer < m1.optimizer


def test_context_communication_is_the_formula():
    """Hand-computed bytes for GPT-2 small (L = 12 blocks, h = 768, 12 heads, no GQA: d_kv = h/T), bf16 (e = 2),
    s = 1024, micro-batch b = 2, T = 2, C = 4, D = 1, global batch 8 (m = 4 micro-batches), on one node
    (450 GB/s): ring 3·(C−1)·2·(s/C)·b·d_kv·e per layer and micro-batch (4· with recomputation); Ulysses
    2·(C−1)/C·(s/C)·b·(h/T)·4·e (3· with recomputation). Compute is C = 1's over C; the data-parallel gradient
    traffic goes over D·C ranks."""
    cfg = load_config(GPT2, ["train.global_batch_size=8", "train.micro_batch_size=2"])
    shape, s, net = model_shape(cfg), _setting(cfg), Network(accelerator("h100"), 8, 0.45)
    ring = Candidate(2, 1, 1, 1, "none", False, 2, context=4, context_attention="ring")
    bw, m, layers = 450e9, 4, 12
    d_kv = 768 / 2
    ring_bytes = 3 * 3 * 2 * (1024 / 4) * 2 * d_kv * 2  # (3 passes)·(C−1)·2·(s/C)·b·d_kv·e = 7,077,888
    assert ring_bytes == 7_077_888
    assert step_time(shape, ring, s, net).context == pytest.approx(m * layers * ring_bytes / bw, rel=1e-9)
    recomputed = dataclasses.replace(ring, checkpointing="selective")
    assert step_time(shape, recomputed, s, net).context == pytest.approx(m * layers * 4 / 3 * ring_bytes / bw,
                                                                         rel=1e-9)
    ulysses = dataclasses.replace(ring, context_attention="ulysses")
    ulysses_bytes = 2 * (3 / 4) * (1024 / 4) * 2 * (768 / 2) * 4 * 2  # = 2,359,296
    assert ulysses_bytes == 2_359_296
    assert step_time(shape, ulysses, s, net).context == pytest.approx(m * layers * ulysses_bytes / bw, rel=1e-9)
    plain = dataclasses.replace(ring, context=1)
    t1, t4 = step_time(shape, plain, s, net), step_time(shape, ring, s, net)
    assert t1.context == 0 and t4.compute == pytest.approx(t1.compute / 4, rel=1e-9)
    assert t4.tensor == pytest.approx(t1.tensor / 4, rel=1e-9)
    # gradients over data × context: D = 2, C = 2 moves what D = 4, C = 1 moves
    dc = step_time(shape, Candidate(1, 1, 2, 1, "none", False, 1, context=2), s, net).data
    assert dc == pytest.approx(step_time(shape, Candidate(1, 1, 4, 1, "none", False, 1), s, net).data, rel=1e-9)
    assert dc > 0


def test_a_sequence_no_single_rank_holds_gets_context_parallelism():
    """GPT-3 6.7B with rotary positions at 512k tokens on one node of 8 H100s: no C = 1 layout fits (tensor
    parallelism, sequence parallelism and full recomputation included), the best layout splits the sequence and
    its overrides load for 8 ranks. At 128k tokens on 16 H100s layouts with C = 1 fit (TP, SP, full
    recomputation), but the fastest one splits the sequence."""
    base = ["model.positions=rotary", "train.global_batch_size=8"]
    long = [*base, "data.seq_len=524288", "model.max_seq_len=524288"]
    plan = make_plan(load_config(REPO / "configs/gpt3-6.7b.yaml", long), 8, 8, accelerator("h100"))
    assert plan.ranked and not [e for e in plan.ranked if e.candidate.context == 1]
    best = plan.ranked[0]
    assert best.candidate.context > 1 and best.peak.total <= accelerator("h100").memory_bytes
    print(f"\n512k tokens on 8 H100s: {len(plan.ranked)} of {plan.considered} fit; best "
          f"{' '.join(best.candidate.overrides())} ({best.peak.total / 2**30:.1f} GiB)")
    load_config(REPO / "configs/gpt3-6.7b.yaml", long + best.candidate.overrides(), world_size=8)
    mid = [*base, "train.global_batch_size=16", "data.seq_len=131072", "model.max_seq_len=131072"]
    plan = make_plan(load_config(REPO / "configs/gpt3-6.7b.yaml", mid), 16, 8, accelerator("h100"))
    assert any(e.candidate.context == 1 for e in plan.ranked) and plan.ranked[0].candidate.context > 1


def test_only_valid_context_splits_are_proposed():
    """GPT-2 small (12 heads) at s = 516 = 4·129 on 8 GPUs: C = 2 is the only context size (chunks of at least 128
    tokens, s divisible by 2C); sequence parallelism with C = 2 needs s divisible by 2C·T (not at T = 2); Ulysses
    needs each tensor rank's heads divisible by C (6 at T = 2, not 3 at T = 4); no context with pipeline stages.
    Attention dropout or fairscale: no context parallelism at all, and a note says why."""
    cfg = load_config(GPT2, ["data.seq_len=516", "train.global_batch_size=16"])
    plan = make_plan(cfg, 8, 8, accelerator("h100"))
    found = [e.candidate for e in plan.ranked] + [plan.smallest.candidate]
    every = candidates(cfg, check_splits(cfg, plan.shape, 8, 8, {}), plan.shape)
    assert len(every) == plan.considered
    for c in every + found:
        assert c.world == 8 and 516 % (2 * c.context) == 0 and c.context in (1, 2)
        assert c.context == 1 or c.pipeline == 1
        assert not (c.context > 1 and c.sequence_parallel and 516 % (2 * c.context * c.tensor))
        assert c.context_attention == "ring" or (12 // c.tensor) % c.context == 0
    kinds = {(c.tensor, c.context, c.context_attention, c.sequence_parallel) for c in every}
    assert (2, 2, "ulysses", False) in kinds and (1, 2, "ring", False) in kinds
    assert (2, 2, "ring", True) not in kinds and (4, 2, "ulysses", False) not in kinds
    for override, why in (("model.attention_dropout=0.1", "model.attention_dropout is 0.1"),
                          ("parallel.engine=fairscale parallel.zero_stage=1", "parallel.engine=fairscale")):
        other = make_plan(load_config(GPT2, ["data.seq_len=516", "train.global_batch_size=16", *override.split()]),
                          8, 8, accelerator("h100"))
        assert other.considered and all(e.candidate.context == 1 for e in other.ranked)
        assert any("context parallelism (parallel.context) was not searched" in n and why in n for n in other.notes)


def test_the_given_layout_keeps_its_context():
    """parallel.context=2 parallel.context_attention=ulysses over 8 GPUs: the "as given" layout has C = 2, D = 4,
    half the activations of the same config at C = 1 with D = 4 (4 GPUs), and Ulysses' communication; the table
    and the JSON carry the context size and algorithm."""
    cfg = load_config(GPT2, ["parallel.context=2", "parallel.context_attention=ulysses", "parallel.zero_stage=1"],
                      world_size=8)
    c, problem = given_candidate(cfg, 8)
    assert problem is None and (c.context, c.context_attention, c.data, c.world) == (2, "ulysses", 4, 8)
    plan = make_plan(cfg, 8, 8, accelerator("h100"))
    one = make_plan(load_config(GPT2, ["parallel.zero_stage=1"]), 4, 8, accelerator("h100")).given
    assert plan.given.time.context > 0 and one.time.context == 0
    assert plan.given.peak.activations == pytest.approx(one.peak.activations / 2, rel=1e-6)
    proc = run_cli("plan", "--config", "configs/gpt2-small.yaml", "--gpus", "8", "parallel.context=2",
                   "parallel.context_attention=ulysses", "--json")
    assert proc.returncode == 0, proc.stderr
    given = json.loads(proc.stdout)["given"]
    assert given["layout"]["context"] == 2 and given["layout"]["context_attention"] == "ulysses"
    assert "parallel.context=2" in given["overrides"] and given["step_time"]["context"] > 0
    text = run_cli("plan", "--config", "configs/gpt2-small.yaml", "--gpus", "8", "parallel.context=2",
                   "--top", "2").stdout
    given_row = next(line for line in text.splitlines() if line.startswith("given"))
    assert given_row.split()[1:4] == ["1", "2", "ring"] and " CP CP attn " in text
    assert "context-parallel communication" in text
    bad = run_cli("plan", "--config", "configs/gpt2-small.yaml", "--gpus", "6", "parallel.context=4")
    assert bad.returncode == 2 and "parallel.context=4" in bad.stderr and "does not divide --gpus 6" in bad.stderr
