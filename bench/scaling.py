"""Scaling efficiency of the parallel layouts, 1 -> 2 -> 4 ranks: each point is bench/throughput.py under
torchrun (gloo on CPU, NCCL on GPUs when present), one thread per rank on the CPU.

    layout   ranks n                               batch                       kind
    dp       data parallel (DeepSpeed, ZeRO 0)     per-rank micro-batch fixed  weak scaling (global = micro × n)
    zero1    data parallel + ZeRO-1                per-rank micro-batch fixed  weak scaling
    tp       tensor parallel n                     global batch fixed          strong scaling
    pp       pipeline parallel n (1F1B)            global batch fixed          strong scaling (4 micro-batches)
efficiency(n) = tokens/s(n) / (n × tokens/s(1)): 1.0 is linear. The 1-rank point of each layout is the same
config on one rank (dp, tp: the plain engine; zero1: DeepSpeed ZeRO-1 on one rank; pp: 4 accumulated
micro-batches). On the CPU more ranks than cores oversubscribe them: efficiency then drops for that reason alone
(the table says so). A point during which other processes took more than --max-foreign of the CPU is run again.

Run: python bench/scaling.py [--layouts dp,zero1,tp,pp] [--ranks 1,2,4] [--steps 10] [--config FILE] [overrides]
     writes bench/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import REPO, RESULTS, ForeignLoad, machine, write_json  # noqa: E402
from bigtrain.distributed.rendezvous import free_port  # noqa: E402

# The model of every point: 4 blocks (divisible into 1, 2, 4 stages), d_model 128, 4 heads, seq 64.
MODEL = ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.d_ff=512", "model.max_seq_len=64",
         "data.seq_len=64", "log.tensorboard=false", "train.threads=1"]
MICRO = 8  # sequences per micro-batch


def layout_overrides(layout: str, n: int) -> list[str]:
    if layout in ("dp", "zero1"):
        zero = 1 if layout == "zero1" else 0
        return [f"train.global_batch_size={MICRO * n}", f"train.micro_batch_size={MICRO}",
                f"parallel.zero_stage={zero}"]
    if layout == "tp":
        return [f"train.global_batch_size={MICRO}", f"train.micro_batch_size={MICRO}", f"parallel.tensor={n}"]
    if layout == "pp":
        return [f"train.global_batch_size={MICRO}", f"train.micro_batch_size={MICRO // 4}", f"parallel.pipeline={n}"]
    raise SystemExit(f"unknown layout {layout!r}; expected dp, zero1, tp or pp")


def point(layout: str, n: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One throughput run of `layout` on `n` ranks; its throughput.py result."""
    out = tmp / f"{layout}-{n}.json"
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "bench" / "throughput.py"), "--no-probe",
           f"--warmup={args.warmup}", f"--steps={args.steps}", f"--out={out}"]
    if args.config:
        cmd.append(f"--config={args.config}")
    cmd += [*MODEL, *layout_overrides(layout, n), *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for attempt in range(1 + args.retries):
        with ForeignLoad() as load:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
        if proc.returncode:
            raise SystemExit(f"{layout} on {n} ranks failed:\n{shlex.join(cmd)}\n{proc.stdout[-2000:]}"
                             f"{proc.stderr[-4000:]}")
        if load.share is None or load.share <= args.max_foreign:
            break
        print(f"{layout} on {n} ranks: other processes took {100 * load.share:.0f}% of the CPU; "
              f"{'again' if attempt < args.retries else 'kept'}", flush=True)
    return {**json.loads(out.read_text()), "foreign_cpu_share": load.share}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smoke.yaml", help="base config (the model is set above)")
    parser.add_argument("--layouts", default="dp,zero1,tp,pp")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per point")
    parser.add_argument("--max-foreign", type=float, default=0.1,
                        help="a point during which other processes took more than this share of the CPU is run "
                             "again (--retries times)")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",")]
    gpus = torch.cuda.device_count()
    if gpus and max(ranks) > gpus:
        print(f"{gpus} GPU(s): leaving out {[n for n in ranks if n > gpus]} ranks", flush=True)
        ranks = [n for n in ranks if n <= gpus]
    cores = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bigtrain-scaling-") as name:
        base: dict[tuple[str, int], dict[str, Any]] = {}
        for layout in args.layouts.split(","):
            for n in ranks:
                key = ("plain" if layout in ("dp", "tp") and n == 1 else layout, n)
                if key not in base:
                    base[key] = point(layout, n, args, Path(name))
                r = base[key]
                rows.append({"layout": layout, "ranks": n, "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"],
                             "engine": r["engine"], "layout_described": r["layout"], "device": r["device"],
                             "tokens_per_step": r["tokens_per_step"], "foreign_cpu_share": r["foreign_cpu_share"]})
                print(f"{layout:<6} {n} rank(s): {r['tokens_per_s']:.0f} tokens/s ({r['engine']})", flush=True)
    for row in rows:
        one = next(r for r in rows if r["layout"] == row["layout"] and r["ranks"] == min(ranks))
        row["efficiency"] = row["tokens_per_s"] / (row["ranks"] / one["ranks"] * one["tokens_per_s"])
        row["oversubscribed"] = row["device"] == "cpu" and row["ranks"] > cores
    print(f"\n{'layout':<7} {'ranks':>5} {'tokens/s':>10} {'efficiency':>11}  note")
    for r in rows:
        note = f"oversubscribed: {r['ranks']} single-thread ranks on {cores} cores" if r["oversubscribed"] else ""
        print(f"{r['layout']:<7} {r['ranks']:>5} {r['tokens_per_s']:10.0f} {r['efficiency']:11.2f}  {note}")
    result = {"figure": "scaling", "command": " ".join(["python bench/scaling.py", shlex.join(
        sys.argv[1:] if argv is None else argv)]).strip(), "machine": machine(), "model": MODEL, "micro_batch": MICRO,
        "warmup": args.warmup, "steps": args.steps, "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
