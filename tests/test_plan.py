"""`bigtrain plan` (issue 16): its predictions against measured bytes on CPU ranks, its search on the 175B config
over 1024 GPUs, its pipeline partition against DeepSpeed's, and its one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import random
import subprocess

import pytest

from bench.plan_accuracy import LAYOUTS, measure, table
from bigtrain.config import load_config
from bigtrain.models import build_model, count_parameters
from bigtrain.planning import accelerator, make_plan, model_shape
from bigtrain.planning.memory_model import Candidate, rank_parameters, stage_memory, stages
from bigtrain.planning.partition import partition_balanced, partition_uniform
from bigtrain.planning.search import setting
from bigtrain.planning.splits import divisors, layout_splits
from bigtrain.planning.time_model import Network, step_time
from tests.conftest import REPO, run_cli


@pytest.mark.launches
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_memory_matches_measured(name, tmp_path):
    """Saved activations (peak over one step, every micro-batch in flight) and model state (parameters,
    gradients, optimizer state) of every rank within 10% of the plan's prediction for its stage."""
    rows = measure(name, tmp_path)
    print("\n" + table(rows))
    for row in rows:
        assert abs(row.error("activations")) <= 0.10, row
        assert abs(row.error("model_state")) <= 0.10, row


def test_partition_is_deepspeeds():
    from deepspeed.runtime import utils as ds_utils

    rng = random.Random(0)
    for _ in range(200):
        n, parts = rng.randint(1, 24), rng.randint(1, 10)
        weights = [rng.choice([0, 1, 7, 1000, rng.randint(0, 10**6)]) for _ in range(n)]
        assert partition_balanced(weights, parts) == [int(b) for b in ds_utils.partition_balanced(weights, parts)]
        assert partition_uniform(n, parts) == [int(b) for b in ds_utils.partition_uniform(n, parts)]


@pytest.mark.parametrize("config", ["configs/gpt2-small.yaml", "configs/t5-base.yaml", "configs/bert-base.yaml",
                                    "configs/gpt3-1.3b.yaml"])
def test_shape_counts_the_models_parameters(config):
    cfg = load_config(REPO / config)
    shape = model_shape(cfg)
    model = build_model(cfg.model, shape.vocab, "meta")
    assert shape.n_params == count_parameters(model)
    assert rank_parameters(shape.layers, 1) == shape.n_params  # one stage: the tied embedding once
    parts = stages(shape, 2, "parameters")
    copies = sum(any(x.tied for x in part) for part in parts)  # each stage holds its own copy of a tied embedding
    embedding = next(x.params for x in shape.layers if x.kind == "embed")
    assert sum(rank_parameters(part, 1) for part in parts) == shape.n_params + (copies - 1) * embedding


def test_175b_over_1024_gpus_with_a_fitting_layout():
    """The search is arithmetic over a few thousand layouts (6372 here): the count, not a duration, is what keeps
    it quick (the test's time is in `--durations`)."""
    cfg = load_config(REPO / "configs/gpt3-175b.yaml")
    plan = make_plan(cfg, gpus=1024, gpus_per_node=8, accelerator=accelerator("a100-80gb"))
    print(f"\nplanned {plan.considered} layouts; best {' '.join(plan.ranked[0].candidate.overrides())}")
    assert 0 < plan.considered < 10_000
    best = plan.ranked[0]
    assert best.fits and best.candidate.tensor <= 8
    assert best.peak.total <= 79.2 * 2**30
    assert 0.2 < best.mfu < 0.45  # bounded by the assumed 45% efficiency, minus communication and bubble
    # the proposed overrides make a config that loads for 1024 ranks
    load_config(REPO / "configs/gpt3-175b.yaml", best.candidate.overrides(), world_size=1024)
    # one GPU cannot hold it: every layout of 1 GPU is refused
    assert not make_plan(cfg, gpus=1, gpus_per_node=8, accelerator=accelerator("h100")).ranked


def test_time_model_bubble_and_ranking():
    """The bubble is (p − 1)/(m + p − 1) of the step; with enough memory a small model prefers pure data
    parallelism over tensor or pipeline parallelism."""
    cfg = load_config(REPO / "configs/gpt2-small.yaml", ["train.global_batch_size=64"])
    shape = model_shape(cfg)
    net = Network(accelerator("h100"), 8, 0.45)
    s = setting(cfg, on_gpu=True, framework_bytes=2**30)
    c = Candidate(1, 4, 2, 1, "none", False, 4)  # m = 64 / (4 · 2) = 8 micro-batches
    t = step_time(shape, c, s, net)
    slots = t.compute + t.tensor + t.overhead + t.pipeline_bubble
    assert t.pipeline_bubble / slots == pytest.approx(3 / (8 + 3), rel=0.05)  # stages nearly balanced
    plan = make_plan(cfg, gpus=8, gpus_per_node=8, accelerator=accelerator("h100"))
    assert (plan.ranked[0].candidate.tensor, plan.ranked[0].candidate.pipeline) == (1, 1)


@pytest.mark.parametrize("schedule,v,bubble", [("1f1b", 1, 3 / 11), ("interleaved_1f1b", 2, 3 / 19),
                                               ("interleaved_1f1b", 4, 3 / 35)])
def test_time_model_bubble_follows_the_torch_engines_schedule(schedule, v, bubble):
    """Under parallel.engine=torch the bubble is the schedule's (interleaved (p − 1)/(V·m + p − 1), p = 4,
    m = 8); DeepSpeed's pipeline engine stays at 1F1B whatever the schedule key says."""
    cfg = load_config(REPO / "configs/gpt2-small.yaml", ["train.global_batch_size=64"])
    shape, net = model_shape(cfg), Network(accelerator("h100"), 8, 0.45)
    c = Candidate(1, 4, 2, 1, "none", False, 4)
    for engine, expected in (("torch", bubble), ("deepspeed", 3 / 11)):
        s = dataclasses.replace(setting(cfg, on_gpu=True, framework_bytes=2**30), engine=engine,
                                pipeline_schedule=schedule, virtual_stages=v)
        t = step_time(shape, c, s, net)
        slots = t.compute + t.tensor + t.overhead + t.pipeline_bubble
        assert t.pipeline_bubble / slots == pytest.approx(expected, rel=0.05), engine


def test_fairscale_plans_fully_sharded_layouts():
    """With parallel.engine=fairscale the plan covers OSS, OSS + ShardedDataParallel and FSDP, no pipeline;
    FSDP's model state is (4Ψ + 4Ψ + 8Ψ)/D."""
    cfg = load_config(REPO / "configs/gpt3-1.3b.yaml", ["parallel.engine=fairscale", "parallel.zero_stage=1"])
    plan = make_plan(cfg, gpus=8, gpus_per_node=8, accelerator=accelerator("h100"))
    stages_seen = {e.candidate.zero_stage for e in plan.ranked}
    assert stages_seen <= {1, 2, 3} and 3 in stages_seen
    assert all(e.candidate.pipeline == 1 for e in plan.ranked)
    fsdp = next(e for e in plan.ranked if e.candidate.zero_stage == 3 and e.candidate.tensor == 1)
    psi = model_shape(cfg).n_params
    assert fsdp.peak.model_state == pytest.approx(16 * psi / fsdp.candidate.data, rel=0.02)


def test_torch_engine_plans_fsdp2_layouts():
    """With parallel.engine=torch on several GPUs the plan covers FSDP2 at ZeRO-2 and ZeRO-3 without stages, and
    torch's pipeline schedules with stages held whole (zero_stage 0) or sharded with FSDP2 over their data ranks
    (2, 3): what the config check accepts. FSDP2's model state is (4Ψ + 4Ψ + 8Ψ)/D at both stages, each pipeline
    stage's (4 + 4 + 8)·Ψ_stage/D; ZeRO-2 keeps the gathered stage (2Ψ_stage bytes in bf16) from forward to
    backward, ZeRO-3 only the largest layer and its gradient."""
    cfg = load_config(REPO / "configs/gpt3-1.3b.yaml", ["parallel.engine=torch"])
    plan = make_plan(cfg, gpus=8, gpus_per_node=8, accelerator=accelerator("h100"))
    assert {e.candidate.zero_stage for e in plan.ranked if e.candidate.pipeline == 1} == {2, 3}
    assert {e.candidate.zero_stage for e in plan.ranked if e.candidate.pipeline > 1} == {0, 2, 3}
    assert all(e.candidate.data > 1 for e in plan.ranked if e.candidate.zero_stage and e.candidate.pipeline > 1)
    psi = model_shape(cfg).n_params
    for stage in (2, 3):
        fsdp2 = next(e for e in plan.ranked if e.candidate.zero_stage == stage and e.candidate.tensor == 1)
        assert fsdp2.peak.model_state == pytest.approx(16 * psi / fsdp2.candidate.data, rel=0.02)
    shape, s = model_shape(cfg), setting(cfg, on_gpu=True, framework_bytes=2**30)
    replicas, stage2, stage3 = (stage_memory(shape, Candidate(1, 2, 4, zero, "none", False, 1), s)
                                for zero in (0, 2, 3))
    for whole, sharded2, sharded3 in zip(replicas, stage2, stage3, strict=True):
        assert sharded3.parameters == pytest.approx(whole.parameters / 4, rel=1e-6)
        assert sharded3.optimizer == pytest.approx(whole.optimizer / 4, rel=1e-6)
        assert sharded2.buffers == pytest.approx(whole.parameters / 2, rel=1e-6)  # the bf16 gathered stage
        assert 0 < sharded3.buffers < sharded2.buffers


def _plan(*args: str) -> subprocess.CompletedProcess:
    return run_cli("plan", *args)


def test_plan_command_prints_the_ranked_table_and_json():
    proc = _plan("--config", "configs/gpt3-1.3b.yaml", "--gpus", "16", "--gpu", "h100", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    assert "as given" in proc.stdout and "overrides: parallel.tensor=" in proc.stdout
    assert proc.stdout.count("\n") > 10
    proc = _plan("--config", "configs/gpt3-1.3b.yaml", "--gpus", "16", "--gpu-memory", "40", "--peak-tflops", "300",
                 "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["gpu"]["memory_gib"] == 40 and data["ranked"]
    assert all(r["peak_bytes"] <= 40 * 2**30 for r in data["ranked"])
    speeds = [r["tokens_per_s"] for r in data["ranked"]]
    assert speeds == sorted(speeds, reverse=True)


@pytest.mark.parametrize("args, needle", [
    (["--gpus", "0"], "--gpus must be a positive"),
    (["--gpus", "6", "parallel.tensor=4"], "does not divide --gpus 6"),
    (["--gpus", "8", "--gpu", "b300x"], "is not a GPU bigtrain knows"),
    (["--gpus", "12", "--gpus-per-node", "8"], "not a whole number of nodes"),
    (["--gpus", "8", "--peak-tflops", "300"], "--peak-tflops alone does not say whether a layout fits"),
    (["--gpus", "8", "--efficiency", "nan"], "--efficiency: 'nan' is not a finite number"),
])
def test_bad_input_gives_one_line(args, needle):
    proc = _plan("--config", "configs/smoke.yaml", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_nothing_fits_exits_1_with_the_least_memory():
    proc = _plan("--config", "configs/gpt3-13b.yaml", "--gpus", "1", "--gpu", "a10")
    assert proc.returncode == 1
    assert "no layout fits" in proc.stderr and "GiB per rank" in proc.stderr


def test_a_gpu_count_no_layout_uses_is_refused_naming_the_constraint():
    """`--gpus 65536` said "no layout fits … use more GPUs" although the batch of 32 sequences cannot be split over
    that many ranks; `--gpus 1000000000` searched 80 s for the same answer. Refused now (exit 2), naming the
    constraint and the nearest count that works, after looking at a bounded number of splits."""
    line = one_line(_plan("--config", "configs/smoke.yaml", "--gpus", "65536"))
    assert "No layout of configs/smoke.yaml uses 65536 GPUs: 65536 GPUs need D >= 65536 / (4 x 6) = 2731, more " \
           "than the 32 sequences of a step" in line
    assert "T is one of 1, 2, 4" in line and "P at most 6" in line and "train.global_batch_size=32" in line
    assert "Plan for --gpus 768 (the most below 65536 that some layout uses)" in line
    assert "Plan for --gpus 768" in one_line(_plan("--config", "configs/smoke.yaml", "--gpus", "1000000000"))
    cfg = load_config(REPO / "configs/smoke.yaml")
    shape, parts = model_shape(cfg), {}
    splits = layout_splits(cfg, shape, 10**9, 8, parts)
    assert not splits.found and splits.examined <= len(shape.tensor_sizes) * len(shape.layers)
    assert len(parts) <= len(shape.layers)  # pipeline partitions computed
    assert make_plan(cfg, 768, 8, accelerator("h100")).considered > 0  # the count it proposes has layouts
    # a count below the most, that no split reaches: both neighbours proposed
    line = one_line(_plan("--config", "configs/smoke.yaml", "--gpus", "200", "train.global_batch_size=16",
                        "train.micro_batch_size=16"))
    assert "no T and P (dividing 200) leave a D = 200 / (T x P) that divides 16" in line
    assert "--gpus 192 (the most below 200" in line and "--gpus 256 (the fewest above 200" in line


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bigtrain: error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_divisors_are_found_in_bounded_steps():
    for n in range(1, 400):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
        assert divisors(n, limit=12) == [d for d in range(1, 13) if n % d == 0]
    assert divisors(2**61 - 1, limit=99) == [1]  # a prime: stops at the limit, not at its square root
    assert divisors(10**18, limit=10) == [1, 2, 4, 5, 8, 10]


def test_gpu_memory_alone_takes_the_nearest_known_gpus_peak_and_says_so():
    """ROADMAP's `bigtrain plan --config FILE --gpus N [--gpu-memory GiB]`: --peak-tflops was demanded too."""
    proc = _plan("--config", "configs/gpt2-small.yaml", "--gpus", "8", "--gpu-memory", "40", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["gpu"] == {**data["gpu"], "name": "custom", "memory_gib": 40, "peak_tflops": 312.0,
                           "peak_from": "a100-40gb"}
    assert any("those of the a100-40gb, the known GPU nearest in memory" in note for note in data["notes"])
    assert all(r["peak_bytes"] <= 40 * 2**30 for r in data["ranked"])
    text = _plan("--config", "configs/gpt2-small.yaml", "--gpus", "8", "--gpu-memory", "75", "--top", "1").stdout
    assert "custom (75 GiB, 989 TFLOP/s bf16)" in text and "as the h100's, the known GPU nearest in memory" in text
    both = json.loads(_plan("--config", "configs/gpt2-small.yaml", "--gpus", "8", "--gpu-memory", "40",
                            "--peak-tflops", "300", "--json").stdout)
    assert both["gpu"]["peak_from"] is None and not any("nearest in memory" in n for n in both["notes"])


def test_help_shows_every_default():
    from bigtrain.cli.plan import run_plan

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run_plan(["--help"])
    text = " ".join(out.getvalue().split())
    for default in ("GPUs per node (default 8)", "(default h100 unless --gpu-memory is given)",
                    "nearest to --gpu-memory)", "inside a node (default: the GPU's)",
                    "between nodes (default: the GPU's)", "measured on this GPU, else 0.45)",
                    "workspaces (default 1)", "layouts to list (default 10)"):
        assert default in text, default
