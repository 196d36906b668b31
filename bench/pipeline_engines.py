"""Pipeline engines side by side on one config: DeepSpeed's pipeline engine (1F1B) against PyTorch's
torch.distributed.pipelining schedules under `parallel.engine=torch` (1f1b, interleaved_1f1b, zero_bubble,
dualpipev; V = 2 stages per rank where the schedule interleaves), same ranks, same seed, same data.

Each engine / schedule trains `--steps` steps through launch/train.py under torchrun (gloo on the CPU, one thread
per rank; NCCL with one rank per GPU). The runs go round-robin for `--rounds` rounds so that a machine's drift
falls on all of them alike. Reported per schedule:

    parity       max over steps of |a − b| / |a| for loss and grad_norm against DeepSpeed's 1F1B (fp32: ≲ 1e-5)
    throughput   median over rounds of each run's median tokens/s after `--warmup` steps, and its ratio to
                 DeepSpeed's measured in the same round (the median of those ratios)
    bubble       the schedule's theoretical bubble fraction at this p, m, V (`bigtrain.planning.bubble.bubble_fraction`;
                 for the zero-bubble schedules its bound, the interleaved form at V = 2)

Run: python bench/pipeline_engines.py [--ranks 2] [--steps 20] [--warmup 5] [--rounds 3]
     [--schedules 1f1b,interleaved_1f1b,zero_bubble,dualpipev] [--config FILE] [overrides]
     writes bench/results/pipeline_engines-<device>.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import REPO, RESULTS, data_substitutes, machine, write_json  # noqa: E402
from bench.sharded_engines import _steps  # noqa: E402
from bigtrain.distributed.rendezvous import free_port  # noqa: E402
from bigtrain.planning.bubble import bubble_fraction  # noqa: E402

# 4 blocks: 7 layers (embedding, blocks, norm, head), enough for 2 ranks x 2 stages; 4 micro-batches per step.
MODEL = ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.d_ff=512", "model.max_seq_len=64",
         "data.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=4", "optim.lr=3e-4"]
QUIET = ["train.eval_every=0", "checkpoint.every=0", "train.sample_tokens=0", "checkpoint.resume=false",
         "log.tensorboard=false", "train.threads=1", "model.dropout=0.0", "log.every=1"]
SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble", "dualpipev")
DEEPSPEED = "deepspeed-1f1b"


def settings(name: str) -> list[str]:
    """The overrides that select `name`: DeepSpeed's pipeline engine, or a torch schedule."""
    if name == DEEPSPEED:
        return ["parallel.engine=auto", "parallel.zero_stage=0"]
    v = 1 if name in ("1f1b", "gpipe") else 2
    return ["parallel.engine=torch", "parallel.zero_stage=0", f"parallel.pipeline_schedule={name}",
            f"parallel.virtual_stages={v}"]


def train(name: str, ranks: int, run_dir: Path, args: argparse.Namespace) -> Path:
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "launch" / "train.py")]
    if args.config:
        cmd.append(f"--config={args.config}")
    base = [*([] if args.config else MODEL), *args.overrides]
    data = data_substitutes(args.config, base, world_size=ranks)
    cmd += [*base, *data, *QUIET, f"parallel.pipeline={ranks}", *settings(name), f"train.steps={args.steps}",
            f"run.dir={run_dir}", f"data.cache_dir={run_dir.parent.parent / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
    if proc.returncode:
        raise SystemExit(f"{name} on {ranks} ranks failed:\n{shlex.join(cmd)}\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-4000:]}")
    return run_dir


def speed(run_dir: Path, warmup: int) -> float:
    steps = _steps(run_dir)
    timed = [s for s in sorted(steps) if s > warmup] or sorted(steps)
    return statistics.median(steps[s]["tokens_per_s"] for s in timed)


def parity(reference: Path, run_dir: Path) -> dict[str, float]:
    a, b = _steps(reference), _steps(run_dir)
    steps = sorted(set(a) & set(b))
    return {k: max(abs(a[s][k] - b[s][k]) / max(abs(a[s][k]), 1e-12) for s in steps) for k in ("loss", "grad_norm")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="pipeline ranks (= stages of DeepSpeed's pipeline)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the tokens/s median")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--config", default=None, help="base config (default: the 4-layer model above)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    schedules = [s for s in args.schedules.split(",") if s]
    unknown = sorted(set(schedules) - set(SCHEDULES) - {"gpipe"})
    if unknown:
        parser.error(f"--schedules: unknown {unknown}; choose from {', '.join(SCHEDULES)}, gpipe")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    names = [DEEPSPEED, *schedules]
    speeds: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in schedules}
    worst: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bigtrain-pipelines-") as tmp:
        for r in range(args.rounds):
            runs = {n: train(n, args.ranks, Path(tmp) / f"round{r}" / n / "run", args) for n in names}
            for n in names:
                speeds[n].append(speed(runs[n], args.warmup))
            for n in schedules:
                ratios[n].append(speeds[n][-1] / speeds[DEEPSPEED][-1])
                got = parity(runs[DEEPSPEED], runs[n])
                worst[n] = {k: max(v, worst.get(n, {}).get(k, 0.0)) for k, v in got.items()}
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {speeds[n][-1]:.0f} tok/s" for n in names),
                  flush=True)
    m = 16 // 4 if not args.config else None  # the default model's micro-batches per step (data = 1)
    rows = []
    for n in names:
        v = 1 if n in (DEEPSPEED, "1f1b", "gpipe") else 2
        schedule = "1f1b" if n == DEEPSPEED else n
        rows.append({"engine": n, "tokens_per_s": statistics.median(speeds[n]),
                     "over_deepspeed": statistics.median(ratios[n]) if n in ratios else 1.0,
                     "max_rel_loss": worst.get(n, {}).get("loss", 0.0),
                     "max_rel_grad_norm": worst.get(n, {}).get("grad_norm", 0.0),
                     "bubble_theory": bubble_fraction(schedule, args.ranks, m, v) if m else None})
    print(f"\n{args.ranks} pipeline ranks on {device}, median of {args.rounds} rounds\n| engine / schedule | "
          f"tokens/s | / DeepSpeed 1F1B | max rel. diff loss / grad_norm | bubble (theory) |\n|---|---|---|---|---|")
    for row in rows:
        bubble = f"{row['bubble_theory']:.3f}" if row["bubble_theory"] is not None else "-"
        print(f"| {row['engine']} | {row['tokens_per_s']:.0f} | {row['over_deepspeed']:.2f} | "
              f"{row['max_rel_loss']:.1e} / {row['max_rel_grad_norm']:.1e} | {bubble} |")
    command = " ".join(["python bench/pipeline_engines.py", shlex.join(sys.argv[1:] if argv is None else argv)])
    result = {"figure": "pipeline_engines", "command": command.strip(), "machine": machine(), "ranks": args.ranks,
              "device": device, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "rows": rows}
    write_json(args.out or RESULTS / f"pipeline_engines-{'gpu' if device != 'cpu' else 'cpu'}.json", result)
    return result


if __name__ == "__main__":
    main()
