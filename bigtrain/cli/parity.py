"""`bigtrain parity --config FILE --layout tensor=2,pipeline=2,zero_stage=1 [--steps N] [--shrink]
[--precision fp32|bf16] [section.key=value ...]`: the layout against one device, step by step; exit 0 when
every step is within the tolerance, 1 when not."""

from __future__ import annotations

import argparse
from pathlib import Path

from bigtrain.cli.report import run_guarded


def run_parity(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain parity", description="Train a config under a layout and on "
                                     "one device on the same batches (dropout off) and compare loss and grad_norm "
                                     "step by step.")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--layout", required=True, help="e.g. tensor=2,pipeline=2,zero_stage=1 (keys: tensor, "
                        "pipeline, data, zero_stage, sequence_parallel)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shrink", action="store_true", help="scale the model down, keeping the layout valid")
    parser.add_argument("--precision", default="fp32", help="fp32 (tolerance 1e-5) or bf16 (2e-2)")
    parser.add_argument("--work-dir", type=Path, help="where the two runs go (default: a new temporary folder)")
    parser.add_argument("--script", type=Path, help=argparse.SUPPRESS)  # tests: a training script with a fault
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)

    def command() -> int:
        from bigtrain.train.parity import REPO_LAUNCH, parity

        diffs, tolerance = parity(args.config, args.layout, args.steps, args.shrink, args.precision,
                                  args.overrides, args.work_dir, args.script or REPO_LAUNCH)
        print(f"{'step':>5} {'loss (one device)':>18} {'loss (layout)':>16} {'rel':>9} {'grad_norm rel':>14}")
        for d in diffs:
            print(f"{d.step:>5} {d.loss[0]:>18.6f} {d.loss[1]:>16.6f} {d.rel('loss'):>9.1e} "
                  f"{d.rel('grad_norm'):>14.1e}")
        worst = max(max(d.rel("loss"), d.rel("grad_norm")) for d in diffs)
        ok = worst <= tolerance
        print(f"parity {'PASSED' if ok else 'FAILED'}: largest relative difference {worst:.1e} over {len(diffs)} "
              f"steps (tolerance {tolerance:.0e}, {args.layout})")
        return 0 if ok else 1

    return run_guarded(command, args.debug)
