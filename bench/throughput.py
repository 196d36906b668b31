"""Training throughput of a config on this device and layout: tokens/s, model FLOPs utilization, peak memory, and
which attention kernel runs.

bigtrain's own loop (Trainer, as launch/train.py runs it; timed by bench/harness.py) trains `--warmup` untimed
steps, then `--steps` timed ones; evaluation and checkpoints are off. Under a launcher (torchrun, deepspeed) every
rank runs it and rank 0 reports the job: tokens/s of the whole job (global batch / slowest rank's mean step).

    model FLOPs per token = 6·N + 12·L·d_model·T   (bigtrain/train/flops.py; activation recomputation is not
                                                    counted: it is work, not progress)
    MFU = FLOPs per token × tokens/s / (peak FLOP/s per device × devices)
Peak: the data-sheet dense bf16 figure of known GPUs (H100/H200: 989 TFLOP/s), or log.peak_tflops=X. CPUs have no
table entry: MFU is then left out, and the achieved rate is set against a dense fp32 matrix multiply measured
here (`gemm`; a practical, not a theoretical, peak). Peak memory: the CUDA allocator's peak on a GPU, the
process's peak resident set on the CPU. Placeholder data files (configs/gpt2-small.yaml) are replaced by the
embedded corpus and byte tokenizer: the shapes, and so the speed, stay those of the config.

Run: python bench/throughput.py --config configs/gpt2-small.yaml train.precision=bf16 train.compile=true
     [--warmup 3 --steps 10 --name NAME --out FILE]   (also under torchrun / deepspeed)
     writes bench/results/throughput-NAME.json (NAME: the config's stem + -compiled when train.compile=true)
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import (  # noqa: E402
    RESULTS,
    ForeignLoad,
    bench_config,
    data_substitutes,
    machine,
    peak_memory,
    run_trainer,
    sync,
    write_json,
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--name", help="results name (default: config stem, + -compiled with train.compile=true)")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/throughput-NAME.json)")
    parser.add_argument("--no-probe", action="store_true", help="skip the attention-kernel probe")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of an n×n matrix multiply on this device (best of a few; n = 8192 on a GPU, 2048 on a CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5 if device.type == "cpu" else 20):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def run_dir_for(world_size: int) -> Path:
    """One directory that every rank of a launch names alike (from the rendezvous port)."""
    if world_size == 1:
        return Path(tempfile.mkdtemp(prefix="bigtrain-throughput-"))
    return Path(tempfile.gettempdir()) / f"bigtrain-throughput-{os.environ.get('MASTER_PORT', 'job')}"


def gather(value: Any) -> list[Any]:
    if not torch.distributed.is_initialized():
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse(argv)
    from bigtrain.distributed import detect_env, shutdown_process_group
    from bigtrain.models import resolve_vocab_size
    from bigtrain.planning.flops import flops_per_token, peak_flops

    env = detect_env()
    substitutes = data_substitutes(args.config, args.overrides, env.world_size)
    overrides = [*args.overrides, *substitutes]
    cfg = bench_config(args.config, overrides, args.warmup + args.steps + 1, run_dir_for(env.world_size),
                       env.world_size)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with ForeignLoad() as load:
        times, trainer = run_trainer(cfg, args.warmup, args.steps)
    device = trainer.device
    mine = {"rank": env.rank, "step_s": times.mean_step_s, "memory": peak_memory(device)}
    ranks = gather(mine)
    shutdown_process_group()
    if not env.is_main:
        return None
    shutil.rmtree(cfg.run.dir, ignore_errors=True)

    step_s = max(r["step_s"] for r in ranks)
    tokens_per_s = times.tokens_per_step / step_s
    fpt = flops_per_token(trainer.full_model, cfg.data.seq_len)
    peak = peak_flops(device, cfg.log.peak_tflops)
    achieved = fpt * tokens_per_s
    half = cfg.train.precision in ("bf16", "fp16") and device.type == "cuda"
    gemm = gemm_rate(device, torch.bfloat16 if half else torch.float32)
    vocab = resolve_vocab_size(cfg.model, trainer.tokenizer.vocab_size)
    attention = None if args.no_probe else _probe(cfg, device, vocab)
    name = args.name or (Path(args.config).stem if args.config else "defaults") + (
        "-compiled" if cfg.train.compile else "")
    result = {
        "figure": "throughput", "name": name,
        "command": "python bench/throughput.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "config": args.config, "overrides": args.overrides, "data_substitutes": substitutes,
        "device": str(device), "precision": cfg.train.precision, "compile": cfg.train.compile,
        "launcher": env.launcher, "world_size": env.world_size, "layout": trainer.layout.describe(),
        "engine": type(trainer.engine).__name__, "activation_checkpointing": cfg.parallel.activation_checkpointing,
        "n_params": sum(p.numel() for p in trainer.full_model.parameters()),
        "seq_len": cfg.data.seq_len, "tokens_per_step": times.tokens_per_step, "warmup": args.warmup,
        "steps": args.steps, "step_s": step_s, "tokens_per_s": tokens_per_s, "flops_per_token": fpt,
        "achieved_tflops": achieved / 1e12, "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": achieved / (peak * env.world_size) if peak else None,
        "gemm_tflops": gemm / 1e12, "fraction_of_gemm": achieved / (gemm * env.world_size),
        "peak_memory": [r["memory"] for r in ranks], "attention": attention, "build_s": times.build_s,
        "foreign_cpu_share": load.share if env.world_size == 1 else None}  # other ranks would count as foreign
    _print(result)
    write_json(args.out or RESULTS / f"throughput-{name}.json", result)
    return result


def _probe(cfg: Any, device: torch.device, vocab: int) -> dict[str, Any]:
    from bench.attention_probe import attention_backend

    return attention_backend(cfg, device, vocab)


def _print(r: dict[str, Any]) -> None:
    mem = max(m["bytes"] for m in r["peak_memory"]) / 2**30
    kind = r["peak_memory"][0]["kind"]
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak for this device; log.peak_tflops=X)"
    att = r["attention"]
    rows = [
        ("config", f"{r['config']} {' '.join(r['overrides'])}".strip()),
        ("model", f"{r['n_params'] / 1e6:.1f}M parameters, seq {r['seq_len']}, {r['tokens_per_step']} tokens/step"),
        ("device / layout", f"{r['device']} ({r['machine'].get('gpu', r['machine']['cpu'])}), {r['precision']}, "
                            f"compile={r['compile']}, {r['world_size']} rank(s), {r['layout']}, {r['engine']}"),
        ("step", f"{1e3 * r['step_s']:.1f} ms (mean of {r['steps']} after {r['warmup']} warm-up)"),
        ("tokens/s", f"{r['tokens_per_s']:.0f}"),
        ("model FLOPs", f"{r['flops_per_token'] / 1e6:.1f} MFLOP/token -> {r['achieved_tflops']:.3f} TFLOP/s"),
        ("MFU", mfu),
        ("vs measured GEMM", f"{100 * r['fraction_of_gemm']:.1f}% of {r['gemm_tflops']:.3f} TFLOP/s per device"),
        ("peak memory", f"{mem:.2f} GiB ({kind}, highest rank)"),
        ("attention kernel", f"{att['backend']} {att['operators']}" if att else "not probed"),
    ]
    if r["data_substitutes"]:
        rows.append(("data", "placeholder files replaced: " + " ".join(r["data_substitutes"])))
    for key, value in rows:
        print(f"{key:<18} {value}")


if __name__ == "__main__":
    main()
