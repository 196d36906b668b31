"""bigtrain's whole training step against a minimal hand-written PyTorch loop (bench/minimal_loop.py) of the same
model, batch and optimizer.

bigtrain: the Trainer's loop as launch/train.py runs it (sampler + collate, engine.train_step, the per-step
bookkeeping and logging at the config's log.every, TensorBoard included when the config has it), timed from
entry to entry of each step (bench/harness.py); evaluation and checkpoints are off (train.eval_every=0,
checkpoint.every=0). Runs alternate bigtrain / minimal, `--repeats` times each; every run first trains `--warmup`
untimed steps, then times `--steps` steps (default: a multiple of log.every, so that each window holds the same
share of logging steps, lasting at least --min-seconds: short windows are noisy). A run pair during which other
processes took more than `--max-foreign` of the machine's CPU (read from /proc/stat) is run again, and each pair
first waits (up to `--wait-quiet` s) for the machine to go idle: on a shared machine the others' load, not
bigtrain, would decide the figure. Prints a table (mean ms per step of each run, and how much of it is inside the
engine step / model step), then the medians and last `overhead ratio R` = median bigtrain step / median minimal
step. --breakdown adds one more bigtrain run with the parts of its loop timed (bench/breakdown.py).

Run: python bench/step_overhead.py --config configs/smoke.yaml [--warmup 3 --steps N --repeats 5]
     [--breakdown] [--name NAME] [section.key=value ...]      writes bench/results/step_overhead-NAME.json
"""

from __future__ import annotations

import argparse
import gc
import math
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    RESULTS,
    ForeignLoad,
    StepTimes,
    bench_config,
    machine,
    median,
    run_trainer,
    temp_run_dir,
    wait_for_quiet,
    write_json,
)
from bench.minimal_loop import minimal_loop  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: configs/smoke.yaml's defaults)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--steps", type=int,
                        help="timed steps per run (default: a multiple of log.every lasting --min-seconds)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="shortest timed window, for --steps")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each loop, alternating")
    parser.add_argument("--max-foreign", type=float, default=0.1,
                        help="a run pair during which other processes took more than this share of the machine's "
                             "CPU is run again (at most --max-attempts pairs in all)")
    parser.add_argument("--max-attempts", type=int, default=12)
    parser.add_argument("--wait-quiet", type=float, default=60,
                        help="before each pair, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--breakdown", action="store_true",
                        help="one more bigtrain run with the loop's parts timed (batches, logging, ...)")
    parser.add_argument("--name", help="results name (default: the config file's stem)")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/step_overhead-NAME.json)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


def summary(times: StepTimes) -> dict[str, float]:
    return {"step_ms": 1e3 * times.mean_step_s, "inside_step_ms": 1e3 * times.mean_engine_s,
            "outside_step_ms": 1e3 * (times.mean_step_s - times.mean_engine_s), "build_s": times.build_s}


def calibrate(args: argparse.Namespace, every: int) -> int:
    """Timed steps per run: a multiple of log.every (each window holds the same share of logging steps), at least
    2 * log.every and enough for --min-seconds per run, from a short run of the minimal loop."""
    cfg = bench_config(args.config, args.overrides, args.warmup + every + 1, temp_run_dir("bigtrain-overhead-"))
    step_s = minimal_loop(cfg, args.warmup, every).mean_step_s
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    steps = every * max(2, math.ceil(args.min_seconds / (every * step_s)))
    print(f"{steps} timed steps per run ({step_s * 1e3:.1f} ms a step, at least {args.min_seconds:g} s a run)")
    return steps


def breakdown(args: argparse.Namespace, total: int, steps: int) -> dict[str, Any]:
    """One more bigtrain run with its loop's parts timed (bench/breakdown.py); ms per step of each."""
    from bench.breakdown import timed_parts

    cfg = bench_config(args.config, args.overrides, total, temp_run_dir("bigtrain-overhead-"))
    wait_for_quiet(args.wait_quiet)
    with timed_parts() as parts, ForeignLoad() as load:
        times, trainer = run_trainer(cfg, args.warmup, steps, on_window_start=parts.reset)
    del trainer
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    out = {"step_ms": 1e3 * times.mean_step_s, "outside_step_ms": 1e3 * (times.mean_step_s - times.mean_engine_s),
           "foreign_cpu_share": load.share,
           "parts": {label: {"ms_per_step": 1e3 * parts.seconds[label] / steps, "calls": parts.calls[label]}
                     for label in parts.found}}
    print(f"\nbigtrain's loop, part by part (one more run, {out['step_ms']:.2f} ms/step, "
          f"{out['outside_step_ms']:.3f} ms of it outside engine.train_step):")
    for label, part in out["parts"].items():
        print(f"  {label:<46} {part['ms_per_step']:8.3f} ms/step  ({part['calls']} calls)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    from bigtrain.config import load_config

    steps = args.steps or calibrate(args, load_config(args.config, args.overrides).log.every)
    total = args.warmup + steps + 1
    runs: list[dict[str, Any]] = []
    disturbed: list[dict[str, Any]] = []
    tokens = 0
    while len(runs) < args.repeats and len(runs) + len(disturbed) < args.max_attempts:
        cfg = bench_config(args.config, args.overrides, total, temp_run_dir("bigtrain-overhead-"))
        wait_for_quiet(args.wait_quiet)
        gc.collect()  # the previous run's garbage is not collected inside this one's window
        with ForeignLoad() as load_a:
            ours, trainer = run_trainer(cfg, args.warmup, steps)
        del trainer
        gc.collect()
        with ForeignLoad() as load_b:
            ref = minimal_loop(cfg, args.warmup, steps)
        shutil.rmtree(cfg.run.dir, ignore_errors=True)
        if ours.tokens_per_step != ref.tokens_per_step:
            raise RuntimeError(f"different batches: {ours.tokens_per_step} vs {ref.tokens_per_step} tokens")
        tokens = ours.tokens_per_step
        shares = [load_a.share, load_b.share]
        pair = {"bigtrain": summary(ours), "minimal": summary(ref), "foreign_cpu_share": shares}
        busy = max((x for x in shares if x is not None), default=0.0) > args.max_foreign
        (disturbed if busy else runs).append(pair)
        print(f"run {len(runs) + len(disturbed)}: bigtrain {pair['bigtrain']['step_ms']:.1f} ms/step, minimal "
              f"{pair['minimal']['step_ms']:.1f} ms/step, other processes took "
              f"{' / '.join('?' if x is None else f'{100 * x:.0f}%' for x in shares)} of the CPU"
              + (f" (over {100 * args.max_foreign:.0f}%: not counted, run again)" if busy else ""), flush=True)
    quiet = len(runs) == args.repeats
    if not quiet:  # the machine never went quiet enough: the least disturbed pairs fill in, and the result says so
        disturbed.sort(key=lambda r: max(x or 0.0 for x in r["foreign_cpu_share"]))
        runs += disturbed[:args.repeats - len(runs)]
        print("warning: only some run pairs ran on a quiet machine; the figure below includes disturbed ones")

    med = {side: {k: median([r[side][k] for r in runs]) for k in runs[0][side]} for side in ("bigtrain", "minimal")}
    ratio = med["bigtrain"]["step_ms"] / med["minimal"]["step_ms"]
    name = args.name or (Path(args.config).stem if args.config else "defaults")
    print(f"\n{name}: {tokens} tokens per step, {args.warmup} warm-up + {steps} timed steps per run, "
          f"{args.repeats} alternating runs each; ms per step")
    print(f"{'loop':<10} {'median':>9} {'in step':>9} {'outside':>9}   runs")
    for side in ("bigtrain", "minimal"):
        m = med[side]
        each = " ".join(f"{r[side]['step_ms']:.1f}" for r in runs)
        print(f"{side:<10} {m['step_ms']:9.2f} {m['inside_step_ms']:9.2f} {m['outside_step_ms']:9.2f}   {each}")
    pairs = [r["bigtrain"]["step_ms"] / r["minimal"]["step_ms"] for r in runs]
    print("(in step: inside engine.train_step / the minimal loop's forward-backward-update; outside: data, "
          "logging, bookkeeping)")
    print("ratio of each run pair: " + " ".join(f"{x:.3f}" for x in pairs) +
          f"; their median {median(pairs):.3f} (robust to the machine drifting between pairs)")
    parts = breakdown(args, total, steps) if args.breakdown else None
    command = "python bench/step_overhead.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"figure": "step overhead", "name": name, "command": command, "machine": machine(),
              "config": args.config, "overrides": args.overrides, "tokens_per_step": tokens,
              "warmup": args.warmup, "steps": steps, "repeats": args.repeats, "runs": runs, "median": med,
              "pair_ratios": pairs, "quiet": quiet, "disturbed_runs": disturbed,
              "breakdown": parts, "overhead_ratio": ratio, "target": 1.05}
    write_json(args.out or RESULTS / f"step_overhead-{name}.json", result)
    print(f"overhead ratio {ratio:.3f}")
    return result


if __name__ == "__main__":
    main()
