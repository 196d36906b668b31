"""The benchmark scripts (bench/) run on a tiny config and write their JSON with the expected fields, so they
do not rot; the figures themselves are not asserted (timings on a shared CPU are not pass/fail material)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import report, scaling, step_overhead, throughput

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.max_seq_len=32",
        "data.source=embedded", "data.max_bytes=300000", "data.seq_len=32", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.threads=1", "log.every=2", "log.tensorboard=false"]


def tiny(tmp_path: Path) -> list[str]:
    return [*TINY, f"data.cache_dir={tmp_path / 'cache'}"]


def test_step_overhead_writes_its_result(tmp_path):
    out = tmp_path / "results" / "step_overhead-tiny.json"
    result = step_overhead.main(["--config", "configs/smoke.yaml", "--warmup", "1", "--steps", "2", "--repeats", "2",
                                 "--max-foreign", "1", "--wait-quiet", "0", "--name", "tiny", "--out", str(out),
                                 *tiny(tmp_path)])
    saved = json.loads(out.read_text())
    assert saved["overhead_ratio"] == pytest.approx(result["overhead_ratio"]) and result["overhead_ratio"] > 0
    assert saved["tokens_per_step"] == 4 * 32 and len(saved["runs"]) == 2 and saved["quiet"]
    for side in ("bigtrain", "minimal"):
        assert {"step_ms", "inside_step_ms", "outside_step_ms"} <= saved["median"][side].keys()
    assert {"cpu", "cpus", "torch", "load_average"} <= saved["machine"].keys()
    assert saved["command"].startswith("python bench/step_overhead.py")


def test_throughput_writes_its_result(tmp_path, capsys):
    out = tmp_path / "results" / "throughput-tiny.json"
    throughput.main(["--config", "configs/smoke.yaml", "--warmup", "1", "--steps", "2", "--out", str(out),
                     *tiny(tmp_path)])
    saved = json.loads(out.read_text())
    assert saved["tokens_per_s"] > 0 and saved["flops_per_token"] > 0 and saved["achieved_tflops"] > 0
    assert saved["mfu"] is None  # no peak for a CPU unless log.peak_tflops is given
    assert saved["peak_memory"][0]["bytes"] > 0 and saved["world_size"] == 1
    assert saved["attention"]["backend"] and saved["attention"]["operators"]
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "attention kernel" in printed


def test_placeholder_data_is_replaced():
    from bench.harness import data_substitutes

    assert data_substitutes("configs/gpt2-small.yaml", []) == ["data.source=embedded", "data.tokenizer=byte"]
    assert data_substitutes("configs/smoke.yaml", []) == []


def test_report_renders_every_section(tmp_path):
    results = tmp_path / "results"
    machine = {"cpu": "Test CPU", "cpus": 2, "torch": "2.x", "python": "3.x", "load_average": [1.0, 1.0, 1.0]}
    side = {"step_ms": 10.0, "inside_step_ms": 9.0, "outside_step_ms": 1.0, "build_s": 1.0}
    results.mkdir()
    (results / "step_overhead-a.json").write_text(json.dumps(
        {"name": "a", "command": "python bench/step_overhead.py x", "machine": machine, "tokens_per_step": 8,
         "median": {"bigtrain": side, "minimal": side}, "overhead_ratio": 1.0, "target": 1.05}))
    run = {"device": "cpu", "precision": "fp32", "world_size": 1, "tokens_per_s": 100.0, "achieved_tflops": 0.001,
           "mfu": None, "fraction_of_gemm": 0.5, "gemm_tflops": 0.002, "attention": {"backend": "flash (CPU kernel)"},
           "peak_memory": [{"kind": "peak RSS", "bytes": 2**30}], "machine": machine}
    for name, compiled, speed in (("s", False, 100.0), ("s-compiled", True, 150.0)):
        (results / f"throughput-{name}.json").write_text(json.dumps(
            {**run, "name": name, "compile": compiled, "tokens_per_s": speed, "command": f"cmd {name}"}))
    (results / "scaling.json").write_text(json.dumps(
        {"command": "python bench/scaling.py", "machine": machine, "model": ["model.d_model=8"], "micro_batch": 8,
         "rows": [{"layout": "dp", "ranks": n, "tokens_per_s": 10.0 * n, "efficiency": 1.0 if n == 1 else 0.5,
                   "oversubscribed": n > 2, "device": "cpu"} for n in (1, 4)]}))
    speed = {"tokens_per_s": 100.0, "step_ms": 1.0, "foreign_cpu_share": 0.0}
    (results / "model_speed-cpu.json").write_text(json.dumps(
        {"name": "cpu", "command": "python bench/model_speed.py", "machine": machine, "device": "cpu",
         "precision": "fp32", "threads": 2, "tokens_per_step": 768, "rounds": [{"bigtrain": speed, "reference": speed}],
         "ratios": [1.01], "median_ratio": 1.01, "median_tokens_per_s": {"bigtrain": 101.0, "reference": 100.0},
         "target": 1.0}))
    text = report.main(["--results", str(results), "--out", str(tmp_path / "performance.md")])
    assert "## Model speed" in text and "| 1.010 | 1.010 | met |" in text
    assert "| M1 | no GPU; CPU Test CPU, 2 cores" in text
    assert "1.50× the eager tokens/s" in text and "No GPU was available" in text
    assert "oversubscribed" in text and "python bench/step_overhead.py x" in text


@pytest.mark.launches
def test_scaling_writes_its_result(tmp_path):
    out = tmp_path / "scaling.json"
    scaling.main(["--layouts", "dp", "--ranks", "1,2", "--warmup", "1", "--steps", "2", "--max-foreign", "1",
                  "--out", str(out),
                  f"data.cache_dir={tmp_path / 'cache'}", "data.max_bytes=300000"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layout"], r["ranks"]) for r in rows] == [("dp", 1), ("dp", 2)]
    assert rows[0]["efficiency"] == 1.0 and rows[1]["efficiency"] > 0



@pytest.mark.launches
def test_long_context_writes_its_result(tmp_path, capsys):
    """bench/long_context.py at S = 256, C = 1 and 2 (ring): every point's fields, a rank at C = 2 keeps fewer
    saved bytes than one device, and the planner predicts each point."""
    from bench import long_context

    out = tmp_path / "long_context.json"
    long_context.main(["--seqs", "256", "--contexts", "1", "2", "--attention", "ring", "--repeats", "1",
                       "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["figure"] == "long_context" and saved["command"].startswith("python bench/long_context.py")
    points = {p["context"]: p for p in saved["points"]}
    assert sorted(points) == [1, 2] and all(p["seq"] == 256 and p["attention"] == "ring" for p in points.values())
    for p in points.values():
        assert p["peak_bytes"] == max(p["peak_bytes_ranks"]) and len(p["peak_bytes_ranks"]) == p["context"]
        assert p["tokens_per_s"] > 0 and p["seconds"] > 0 and p["predicted_bytes"] > 0
        assert p["ratio_to_one_cth"] > 0
    assert points[2]["peak_bytes"] < points[1]["peak_bytes"] and points[1]["ratio_to_one_cth"] == 1.0
    assert points[2]["predicted_bytes"] < points[1]["predicted_bytes"]
    assert "× C / C=1" in capsys.readouterr().out

def test_plan_gpu_script_runs_its_path_on_the_cpu(tmp_path):
    """bench/plan_gpu.py (predicted vs measured on a GPU) runs end to end; on the CPU its figures are not
    comparable, so only the shape of the result is checked here."""
    from bench import plan_gpu

    rows = plan_gpu.main(["--cpu-smoke", "--warmup", "1", "--steps", "2", "--out", str(tmp_path / "plan_gpu.json")])
    saved = json.loads((tmp_path / "plan_gpu.json").read_text())
    assert saved["figure"] == "plan_gpu" and len(saved["rows"]) == len(rows) == 1
    row = rows[0]
    assert row["measured"]["peak_bytes"] > 0 and row["measured"]["step_s"] > 0
    assert row["predicted"]["peak_bytes"] > 0 and row["predicted"]["step_s"] > 0


@pytest.mark.launches
def test_tokenize_writes_its_result(tmp_path, capsys):
    """bench/tokenization.py at 1 MB: every run (bigtrain prepare at 1 and 2 workers, byte and BPE; the datasets
    baseline; the start to the first step on prepared data) and the table."""
    from bench import tokenization

    out = tmp_path / "tokenization.json"
    tokenization.main(["--size-mb", "1", "--bpe-mb", "0.5", "--bpe-train-mb", "0.5", "--out", str(out),
                   "--keep", str(tmp_path / "work")])
    saved = json.loads(out.read_text())
    runs = {(r["tool"], r["tokenizer"], r["workers"]) for r in saved["rows"]}
    assert runs == {("bigtrain prepare", t, n) for t in ("byte", "bpe") for n in (1, 2)} | {
        ("datasets from_json + map", t, 2) for t in ("byte", "bpe")}
    for r in saved["rows"]:
        assert r["seconds"] > 0 and r["tokens"] > 0 and r["rss_main"] > 0, r
    byte = [r for r in saved["rows"] if r["tokenizer"] == "byte"]
    assert len({r["tokens"] - (r["documents"] if "documents" in r else 0) for r in byte}) == 1  # the same ids
    assert saved["first_step"]["seconds"] > saved["first_step"]["first_step_s"] > 0
    assert saved["corpus_bytes"] >= 1_000_000 and {"cpu", "cpus"} <= saved["machine"].keys()
    assert "| bigtrain prepare | byte | 2 |" in capsys.readouterr().out


@pytest.mark.launches
@pytest.mark.parametrize("engine", ["fairscale", "torch"])
def test_sharded_engines_compares_deepspeed_and_fairscale(tmp_path, engine):
    """bench/sharded_engines.py at ZeRO-3 (fairscale's FSDP through the CPU helper here, or PyTorch's FSDP2 with
    `--engine torch`): both engines train the same steps, their curves agree (fp32), and tokens/s and
    model-state bytes of both are written."""
    from bench import sharded_engines

    out = tmp_path / "engines.json"
    result = sharded_engines.main(["--engine", engine, "--stages", "3", "--steps", "3", "--warmup", "1", "--out",
                                   str(out), *tiny(tmp_path)])
    saved = json.loads(out.read_text())
    row = saved["rows"][0]
    assert saved["figure"] == "sharded_engines" and result["rows"][0]["stage"] == row["stage"] == 3
    assert saved["engine"] == engine
    assert row["steps"] == 3 and row["max_rel_loss"] < 1e-5 and row["max_rel_grad_norm"] < 1e-5
    assert row["fsdp_on_cpu_shim"] == (engine == "fairscale") and row[f"{engine}_over_deepspeed"] > 0
    assert all(v > 0 for v in row["model_state_bytes_per_rank"].values())


@pytest.mark.launches
def test_pipeline_engines_compares_deepspeed_and_torch_schedules(tmp_path):
    """bench/pipeline_engines.py, one round of 3 steps on 2 pipeline ranks: DeepSpeed's 1F1B and torch's
    interleaved 1F1B train the same curve (fp32) and both tokens/s are written with their ratio."""
    from bench import pipeline_engines

    out = tmp_path / "pipelines.json"
    pipeline_engines.main(["--schedules", "interleaved_1f1b", "--steps", "3", "--warmup", "1", "--rounds", "1",
                           "--out", str(out), *tiny(tmp_path)])
    saved = json.loads(out.read_text())
    assert saved["figure"] == "pipeline_engines" and [r["engine"] for r in saved["rows"]] == [
        "deepspeed-1f1b", "interleaved_1f1b"]
    torch_row = saved["rows"][1]
    assert torch_row["max_rel_loss"] < 1e-5 and torch_row["max_rel_grad_norm"] < 1e-5
    assert torch_row["tokens_per_s"] > 0 and torch_row["over_deepspeed"] > 0


@pytest.mark.launches
def test_checkpoint_forms_measures_the_async_stall(tmp_path, capsys):
    """bench/checkpoint_forms.py --async-stall on the smoke model: a synchronous and an asynchronous save, their
    stall, bytes and peak memory, the background write committed while training goes on, and the table."""
    from bench import checkpoint_forms

    out = tmp_path / "checkpoint_async.json"
    checkpoint_forms.main(["--async-stall", "--sizes", "smoke", "--steps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    row, = saved["rows"]
    assert row["size"] == "smoke" and row["bytes_written"] > 12 * row["n_params"]  # both forms
    assert row["sync"]["stall_s"] > 0 and row["sync"]["peak"] >= 0
    a = row["async"]
    assert a["stall_s"] == pytest.approx(a["capture_s"] + a["commit_s"] + a["polls_s"]) and a["peak"] > 0
    assert row["async_first"]["stall_s"] > 0 and a["committed_after_s"] >= a["capture_s"]
    assert saved["command"].startswith("python bench/checkpoint_forms")
    assert "| smoke | " in capsys.readouterr().out


MODEL_SPEED_TINY = ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_layers=2",
                    "model.max_seq_len=16", "data.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=2"]


def test_model_speed_compares_the_same_function(tmp_path, capsys):
    """One tiny round: both models start from the same weights and compute the same loss at step 0 (and after
    the same AdamW updates), so the tokens/s they are timed at belong to the same computation."""
    from bench import model_speed

    out = tmp_path / "model_speed-tiny.json"
    result = model_speed.main(["--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
                               "--max-foreign", "1", "--out", str(out), *MODEL_SPEED_TINY])
    saved = json.loads(out.read_text())
    ours, ref = saved["parity_losses"]["bigtrain"], saved["parity_losses"]["reference"]
    assert ours[0] == pytest.approx(ref[0], rel=1e-6, abs=1e-6)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert len(saved["ratios"]) == 1 and saved["median_ratio"] == pytest.approx(result["median_ratio"])
    assert saved["median_ratio"] > 0
    assert saved["tokens_per_step"] == 2 * 16 and saved["threads"] == 1
    assert "median ratio" in capsys.readouterr().out


def test_model_speed_refuses_what_the_reference_cannot_be(capsys):
    from bench import model_speed

    with pytest.raises(SystemExit) as exit_info:
        model_speed.main(["--rounds", "1", *MODEL_SPEED_TINY, "model.norm_position=post"])
    assert exit_info.value.code == 2
    assert "model.norm_position=post (allowed: pre)" in capsys.readouterr().err


@pytest.mark.parametrize("options", [[], ["model.norm=rmsnorm", "model.activation=gelu_tanh", "model.bias=false"],
                                     ["model.activation=relu", "model.positions=none"]])
def test_reference_gpt_computes_bigtrain_s_logits(options):
    """The reference GPT loaded from a bigtrain model (Q, K, V rows reordered into one [Q; K; V] projection) gives
    the same logits: the bench times one function written two ways."""
    from bench.model_speed import SHAPE
    from bench.reference_gpt import ReferenceGPT
    from bigtrain.config import load_config
    from bigtrain.models import build_model

    cfg = load_config("configs/smoke.yaml", [*SHAPE, *MODEL_SPEED_TINY, *options]).model
    ours = build_model(cfg, 50, "cpu", seed=4).eval()
    with torch.no_grad():
        for p in ours.parameters():  # away from the initialization's zeros and ones
            p.add_(0.1 * torch.randn_like(p))
    ref = ReferenceGPT(cfg, 50).eval()
    ref.load_from(ours)
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids), ours(input_ids=ids), rtol=1e-5, atol=1e-5)


TINY_MOE = ["--steps", "10", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
            "model.max_seq_len=32", "data.seq_len=32", "data.max_bytes=300000", "train.global_batch_size=8",
            "train.micro_batch_size=8", "train.eval_samples=16", "train.threads=1"]


@pytest.mark.launches
def test_moe_vs_dense_writes_its_result(tmp_path, capsys):
    """bench/moe_vs_dense.py at a tiny scale (d_model 32, 10 steps; two one-process runs): both runs' eval losses
    after the same steps, the MoE's active parameters the dense model's plus its routers' and one more
    down-projection bias per block, and the table. The comparison itself is docs/expert_parallel.md's."""
    from bench import moe_vs_dense

    out = tmp_path / "moe_vs_dense.json"
    moe_vs_dense.main(["--out", str(out), *TINY_MOE, f"data.cache_dir={tmp_path / 'cache'}"])
    saved = json.loads(out.read_text())
    dense, moe = saved["runs"]["dense"], saved["runs"]["moe"]
    assert saved["figure"] == "moe_vs_dense" and saved["command"].startswith("python bench/moe_vs_dense.py")
    assert saved["steps"] == 10 and dense["eval_step"] == moe["eval_step"] == 10
    assert dense["eval_tokens"] == moe["eval_tokens"] > 0
    assert saved["dense_minus_moe_eval_loss"] == pytest.approx(dense["eval_loss"] - moe["eval_loss"])
    assert "moe_aux_loss" in moe and "moe_aux_loss" not in dense
    # 2 blocks: routers 32 x 8 each, and the second expert's down bias (32) each
    assert moe["active_matmul_parameters"] - dense["active_matmul_parameters"] == 2 * (32 * 8 + 32)
    assert moe["parameters"] > 1.9 * dense["parameters"]
    assert "MoE 8x2 (expert d_ff 32)" in capsys.readouterr().out


def test_the_shipped_moe_config_is_smoke_with_the_bench_overrides():
    """configs/moe_8x2.yaml is configs/smoke.yaml with bench/moe_vs_dense.py's MoE overrides (8 experts, top-2)."""
    from bench.moe_vs_dense import moe_overrides
    from bigtrain.config import load_config

    smoke = load_config("configs/smoke.yaml")
    derived = load_config("configs/smoke.yaml", [*moe_overrides(smoke, 8, 2), "run.dir=runs/moe_8x2"])
    assert load_config("configs/moe_8x2.yaml") == derived
