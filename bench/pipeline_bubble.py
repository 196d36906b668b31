"""Pipeline bubble: measured idle fraction of a 2-stage pipeline against the 1F1B formula (p-1)/(m+p-1).

For each number of micro-batches m, the same model and global batch (m micro-batches of `--micro` sequences)
trains for `--steps` steps on one process and as a 2-stage pipeline (torchrun, 2 ranks). With T_1 the
single-process step time, a perfectly balanced pipeline without communication would take T_1 / p, so

    measured idle fraction = 1 - T_1 / (p · T_p)

which includes the bubble plus whatever communication and imbalance cost. The first steps (warm-up) are not
timed. Prints a table and writes bench/results/pipeline_bubble.json (and a plot where matplotlib exists).

    python bench/pipeline_bubble.py                 # m = 1, 2, 4, 8
    python bench/pipeline_bubble.py --micro-batches 1 2 --steps 4 --d-model 64   # quick

With `--schedules` it measures torch.distributed.pipelining's schedules instead (GPipe, 1F1B, interleaved 1F1B,
zero-bubble, ZB-V, DualPipeV), per rank, next to their theory: `bench/schedule_bubble.py`, whose options follow.

    python bench/pipeline_bubble.py --schedules --ranks 2 4 --micro-batches 4 8 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bigtrain.distributed.rendezvous import free_port

REPO = Path(__file__).resolve().parent.parent
STAGES = 2


def _overrides(run_dir: Path, m: int, args: argparse.Namespace) -> list[str]:
    return [f"run.dir={run_dir}", f"data.cache_dir={run_dir.parent / 'cache'}", "data.source=embedded",
            "data.max_bytes=400000", f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
            f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=4",
            f"model.d_ff={4 * args.d_model}", "model.dropout=0.0", "parallel.partition_method=type:BlockPipe",
            f"train.steps={args.steps}", f"train.global_batch_size={m * args.micro}",
            f"train.micro_batch_size={args.micro}", "train.eval_every=0", f"train.eval_samples={args.micro}",
            "train.sample_tokens=0", "train.threads=1", "checkpoint.every=0", "log.every=1",
            "log.tensorboard=false", "log.progress=false", "schedule.warmup_steps=1"]


def _step_time(run_dir: Path, warmup: int) -> float:
    """Mean seconds per step after `warmup` steps, from metrics.jsonl's elapsed_s."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in lines if "elapsed_s" in r}
    last = max(elapsed)
    return (elapsed[last] - elapsed[warmup]) / (last - warmup)


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:4])} ...\n{proc.stderr[-3000:]}")


def measure(m: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    single, piped = work / f"single_m{m}" / "run", work / f"pipe_m{m}" / "run"
    train = str(REPO / "launch" / "train.py")
    _run([sys.executable, train, *_overrides(single, m, args)])
    torchrun = str(Path(sys.executable).parent / "torchrun")
    _run([torchrun, f"--nproc_per_node={STAGES}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
          train, *_overrides(piped, m, args), f"parallel.pipeline={STAGES}"])
    t1, tp = _step_time(single, args.warmup), _step_time(piped, args.warmup)
    return {"micro_batches": m, "single_s": t1, "pipeline_s": tp, "speedup": t1 / tp,
            "idle_measured": 1 - t1 / (STAGES * tp), "idle_1f1b": (STAGES - 1) / (m + STAGES - 1)}


def main() -> None:
    if "--schedules" in sys.argv[1:]:
        sys.path.insert(0, str(REPO))
        from bench import schedule_bubble

        schedule_bubble.main([a for a in sys.argv[1:] if a != "--schedules"])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pipeline_bubble.json")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'m':>3} {'1 process s/step':>17} {'2 stages s/step':>16} {'speed-up':>9} "
              f"{'idle measured':>14} {'idle (p-1)/(m+p-1)':>19}", flush=True)
        for m in args.micro_batches:
            r = measure(m, args, Path(tmp))
            rows.append(r)
            print(f"{m:>3} {r['single_s']:>17.3f} {r['pipeline_s']:>16.3f} {r['speedup']:>9.2f} "
                  f"{r['idle_measured']:>14.3f} {r['idle_1f1b']:>19.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"stages": STAGES, "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {args.out} (no matplotlib: no plot)")
        return
    ms = [r["micro_batches"] for r in rows]
    plt.plot(ms, [r["idle_measured"] for r in rows], "o-", label="measured idle fraction")
    plt.plot(ms, [r["idle_1f1b"] for r in rows], "s--", label="1F1B bubble (p-1)/(m+p-1)")
    plt.xscale("log", base=2)
    plt.xlabel("micro-batches m")
    plt.ylabel("idle fraction")
    plt.title(f"{STAGES}-stage pipeline")
    plt.legend()
    plot = args.out.with_suffix(".png")
    plt.savefig(plot, dpi=120)
    print(f"wrote {args.out} and {plot}")


if __name__ == "__main__":
    main()
