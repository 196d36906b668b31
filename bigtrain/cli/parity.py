"""`bigtrain parity` (its synopsis: `bigtrain.cli.USAGE`): does this layout compute what one device computes, for
this config? Exit 0 when every step is within the tolerance, 1 when not.

Runs the config twice on this machine, on the same global batches with dropout off: once in one process (the
reference) and once under the given layout, launching its ranks with torchrun (CPU gloo, or the local GPUs);
then compares `loss` and `grad_norm` step by step:

    rel(step) = |layout - reference| / |reference|,  verdict: max over steps ≤ tolerance (fp32 1e-5, bf16 2e-2)

`shrink` scales the model down (layers 2 per stage, 2 heads per tensor rank, width 16 per head, a small
vocabulary and context) keeping the layout valid, so the layout of a 175B config can be checked on one machine.
Both runs are `python -m bigtrain.cli.train` of the bigtrain this command runs from (a checkout or a wheel).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bigtrain.cli.arguments import CommandParser, path, whole
from bigtrain.cli.launching import child_env, torchrun
from bigtrain.cli.report import run_guarded
from bigtrain.errors import ConfigError

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
LAYOUT_KEYS = {"tensor": "parallel.tensor", "pipeline": "parallel.pipeline", "data": "parallel.data",
               "zero_stage": "parallel.zero_stage", "sequence_parallel": "parallel.sequence_parallel"}
TRAIN = ["-m", "bigtrain.cli.train"]  # a training process of this very bigtrain (python or torchrun)


@dataclass
class StepDiff:
    step: int
    loss: tuple[float, float]
    grad_norm: tuple[float, float]

    def rel(self, key: str) -> float:
        ref, got = getattr(self, key)
        return abs(got - ref) / abs(ref) if ref else abs(got - ref)


def parse_layout(text: str) -> dict[str, str]:
    """'tensor=2,pipeline=2,zero_stage=1' -> {'parallel.tensor': '2', ...}; unknown keys are refused."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in LAYOUT_KEYS or not value:
            raise ConfigError(f"--layout {text!r}: '{part}' is not KEY=VALUE with KEY one of "
                              f"{', '.join(LAYOUT_KEYS)} (e.g. --layout tensor=2,pipeline=2,zero_stage=1).")
        out[LAYOUT_KEYS[key]] = value
    if not out:
        raise ConfigError("--layout is empty: give e.g. --layout tensor=2 or --layout data=2,zero_stage=3.")
    return out


def ranks_of(layout: dict[str, str]) -> int:
    size = 1
    for key in ("parallel.tensor", "parallel.pipeline", "parallel.data"):
        value = layout.get(key, "1")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--layout: {key.split('.')[1]}={value} must be a positive integer.")
        size *= int(value)
    return size


def shrunk(layout: dict[str, str]) -> list[str]:
    """Overrides that make the model small while every split of `layout` stays valid."""
    tensor, pipeline = int(layout.get("parallel.tensor", "1")), int(layout.get("parallel.pipeline", "1"))
    heads = 2 * tensor
    return [f"model.n_layers={2 * pipeline}", f"model.n_heads={heads}", "model.n_kv_heads=null",
            f"model.d_model={16 * heads}", f"model.d_ff={64 * heads}", "model.max_seq_len=64", "data.seq_len=32",
            "model.vocab_size=null", f"model.vocab_multiple={64 * tensor}", "model.n_decoder_layers=null",
            "data.source=embedded", "data.tokenizer=byte"]


def compare(ref_dir: Path, run_dir: Path) -> list[StepDiff]:
    def lines(run: Path) -> dict[int, dict]:
        out = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record
        return out

    ref, got = lines(ref_dir), lines(run_dir)
    if sorted(ref) != sorted(got):
        raise ConfigError(f"the runs logged different steps ({sorted(ref)} vs {sorted(got)}).")
    return [StepDiff(s, (ref[s]["loss"], got[s]["loss"]), (ref[s]["grad_norm"], got[s]["grad_norm"]))
            for s in sorted(ref)]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain:")][-3:]
        raise ConfigError(f"the {what} run failed (status {proc.returncode}): " + (" ".join(tail) or
                          proc.stderr[-800:]))


def parity(config: Path, layout_text: str, steps: int = 20, shrink: bool = False, precision: str = "fp32",
           overrides: list[str] | None = None, work_dir: Path | None = None,
           script: Path | None = None) -> tuple[list[StepDiff], float]:
    """Train `steps` steps of `config` on one process and under the layout; the per-step differences and the
    tolerance they are held to. `script`: a training script to run instead of `bigtrain train` (tests)."""
    if precision not in TOLERANCE:
        raise ConfigError(f"--precision {precision}: choose fp32 or bf16.")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: give at least 1.")
    layout = parse_layout(layout_text)
    ranks = ranks_of(layout)
    work = Path(work_dir or tempfile.mkdtemp(prefix="bigtrain-parity-"))
    common = [*(shrunk(layout) if shrink else []), *(overrides or []), "model.dropout=0.0",
              "model.attention_dropout=0.0", f"train.steps={steps}", "train.eval_every=0", "train.sample_tokens=0",
              "checkpoint.every=0", "checkpoint.layout_free_every=0", "log.every=1", "log.tensorboard=false",
              "log.progress=false", f"train.precision={precision}", "train.threads=1"]
    layout_args = [f"{k}={v}" for k, v in layout.items()]
    program = [str(script)] if script is not None else TRAIN  # after `python`; torchrun takes `-m` the same way
    _run([sys.executable, *program, "--config", str(config), *common, "parallel.tensor=1", "parallel.pipeline=1",
          "parallel.zero_stage=0", f"run.dir={work / 'reference'}"], "one-device reference")
    _run([*torchrun(ranks), *program, "--config", str(config), *common, *layout_args, f"run.dir={work / 'layout'}"],
         f"layout ({layout_text})")
    return compare(work / "reference", work / "layout"), TOLERANCE[precision]


def run_parity(argv: list[str]) -> int:
    parser = CommandParser(prog="bigtrain parity", description="Train a config under a layout and on one device on "
                           "the same batches (dropout off) and compare loss and grad_norm step by step.")
    parser.add_argument("--config", type=path, required=True)
    parser.add_argument("--layout", required=True, help="e.g. tensor=2,pipeline=2,zero_stage=1 (keys: tensor, "
                        "pipeline, data, zero_stage, sequence_parallel)")
    parser.add_argument("--steps", type=whole, default=20)
    parser.add_argument("--shrink", action="store_true", help="scale the model down, keeping the layout valid")
    parser.add_argument("--precision", default="fp32", help="fp32 (tolerance 1e-5) or bf16 (2e-2)")
    parser.add_argument("--work-dir", type=path, help="where the two runs go (default: a new temporary folder)")
    parser.add_argument("--script", type=path, help=argparse.SUPPRESS)  # tests: a training script with a fault
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse(argv)

    def command() -> int:
        diffs, tolerance = parity(args.config, args.layout, args.steps, args.shrink, args.precision,
                                  args.overrides, args.work_dir, args.script)
        print(f"{'step':>5} {'loss (one device)':>18} {'loss (layout)':>16} {'rel':>9} {'grad_norm rel':>14}")
        for d in diffs:
            print(f"{d.step:>5} {d.loss[0]:>18.6f} {d.loss[1]:>16.6f} {d.rel('loss'):>9.1e} "
                  f"{d.rel('grad_norm'):>14.1e}")
        worst = max(max(d.rel("loss"), d.rel("grad_norm")) for d in diffs)
        ok = worst <= tolerance
        print(f"parity {'PASSED' if ok else 'FAILED'}: largest relative difference {worst:.1e} over {len(diffs)} "
              f"steps (tolerance {tolerance:.0e}, {args.layout})")
        return 0 if ok else 1

    return run_guarded(command, args.debug, {"--work-dir": args.work_dir})
