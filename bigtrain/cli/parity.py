"""`bigtrain parity` (its synopsis: `bigtrain.cli.USAGE`): does this layout compute what one device computes, for
this config? Exit 0 when it does (within the noise floor, `bigtrain.cli.parity_verdict`), 1 when not.

Before anything starts, the config is checked as each run will load it (`load_run_config`: the layout on its rank
count, the reference on one process) and the machine's room for the layout's ranks (`check_local_ranks`). Then it
trains the config on the same global batches with dropout off: under the given layout, launching its ranks with
torchrun (CPU gloo, or the local GPUs); in one process (the reference); and, when the layout is outside the
tolerance at some step, once more in one process with the global batch split into other micro-batches (the noise
floor); it compares `loss` and `grad_norm` step by step, printing which run is training and its step on
stderr meanwhile. Every process it starts, and its default work folder, end with it (`bigtrain.cli.launching`).

`shrink` scales the model down (layers 2 per stage, 2 heads per tensor rank, width 16 per head, a small
vocabulary and context) keeping the layout valid, so the layout of a 175B config can be checked on one machine.
The runs are `python -m bigtrain.cli.train` of the bigtrain this command runs from (a checkout or a wheel).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bigtrain.cli.arguments import CommandParser, path, whole
from bigtrain.cli.capacity import check_local_ranks, visible_gpus
from bigtrain.cli.launching import Launch
from bigtrain.cli.parity_locate import TOLERANCE as LOCATE_TOLERANCE
from bigtrain.cli.parity_locate import Located, locate_report
from bigtrain.cli.parity_locate import locate as locate_step
from bigtrain.cli.parity_tensors import compare_tensors
from bigtrain.cli.parity_verdict import NOISE_FACTOR, TOLERANCE, StepDiff, Verdict, compare, judge, within_tolerance
from bigtrain.cli.report import run_guarded
from bigtrain.errors import ConfigError

LAYOUT_KEYS = {"tensor": "parallel.tensor", "pipeline": "parallel.pipeline", "data": "parallel.data",
               "zero_stage": "parallel.zero_stage", "sequence_parallel": "parallel.sequence_parallel",
               "context": "parallel.context", "context_attention": "parallel.context_attention",
               "expert": "parallel.expert"}
ONE_DEVICE = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.data=1", "parallel.context=1", "parallel.expert=1",
              "parallel.zero_stage=0", "parallel.sequence_parallel=false", "parallel.engine=auto",
              "parallel.pipeline_schedule=1f1b", "parallel.virtual_stages=1"]  # the plain engine on one process
TRAIN = ["-m", "bigtrain.cli.train"]  # a training process of this very bigtrain (python or torchrun)
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \|")  # a training process's step line (bigtrain.train.metrics.Progress)


def parse_layout(text: str) -> dict[str, str]:
    """'tensor=2,pipeline=2,zero_stage=1' -> {'parallel.tensor': '2', ...}; unknown or repeated keys are refused."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in LAYOUT_KEYS or not value:
            raise ConfigError(f"--layout {text!r}: '{part}' is not KEY=VALUE with KEY one of "
                              f"{', '.join(LAYOUT_KEYS)} (e.g. --layout tensor=2,pipeline=2,zero_stage=1).")
        if LAYOUT_KEYS[key] in out:
            raise ConfigError(f"--layout {text!r}: '{key}' is given twice ({out[LAYOUT_KEYS[key]]} and {value}); "
                              f"give each key once (e.g. --layout {key}={value}).")
        out[LAYOUT_KEYS[key]] = value
    if not out:
        raise ConfigError("--layout is empty: give e.g. --layout tensor=2 or --layout data=2,zero_stage=3.")
    return out


def ranks_of(layout: dict[str, str]) -> int:
    """tensor × pipeline × data × context; without `data`, expert groups need expert data ranks (data = expert)."""
    size = 1
    for key in ("parallel.tensor", "parallel.pipeline", "parallel.data", "parallel.context"):
        value = layout.get(key, layout.get("parallel.expert", "1") if key == "parallel.data" else "1")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--layout: {key.split('.')[1]}={value} must be a positive integer.")
        size *= int(value)
    return size


def shrunk(layout: dict[str, str]) -> list[str]:
    """Overrides that make the model small while every split of `layout` stays valid."""
    tensor, pipeline = int(layout.get("parallel.tensor", "1")), int(layout.get("parallel.pipeline", "1"))
    context = int(layout.get("parallel.context", "1"))
    heads, seq = 2 * tensor * context, 32 * context  # Ulysses: heads per tensor rank by C; 2C chunks of 16
    return [f"model.n_layers={2 * pipeline}", f"model.n_heads={heads}", "model.n_kv_heads=null",
            f"model.d_model={16 * heads}", f"model.d_ff={64 * heads}", f"model.max_seq_len={max(64, seq)}",
            f"data.seq_len={seq}",
            "model.vocab_size=null", f"model.vocab_multiple={64 * tensor}", "model.n_decoder_layers=null",
            "data.source=embedded", "data.tokenizer=byte"]


def other_split(global_batch: int, micro: int) -> int | None:
    """A micro-batch size other than `micro` that splits `global_batch` on one process (the noise floor's): the
    largest proper divisor of `micro`, or for micro-batches of 1 the smallest divisor of the batch above 1."""
    if micro > 1:
        return max(d for d in range(1, micro) if micro % d == 0)
    return next((d for d in range(2, global_batch + 1) if global_batch % d == 0), None)


@dataclass
class Runs:
    """The runs, checked: each one's overrides, the layout's rank count and the noise floor's micro-batch."""

    reference: list[str]
    layout: list[str]
    ranks: int
    floor_micro: int | None
    gpus: int | None


def check_runs(config: Path, layout_text: str, steps: int, shrink: bool, precision: str,
         overrides: list[str]) -> Runs:
    """Check everything a run would refuse, before any starts: the arguments, then each run's config as it will
    load it (the layout on its ranks, the reference on one process)."""
    from bigtrain.parallel.validate import load_run_config

    if precision not in TOLERANCE:
        raise ConfigError(f"--precision {precision}: choose fp32 or bf16.")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: give at least 1.")
    layout = parse_layout(layout_text)
    ranks = ranks_of(layout)
    common = [*(shrunk(layout) if shrink else []), *overrides, "model.dropout=0.0",
              "model.attention_dropout=0.0", f"train.steps={steps}", "train.eval_every=0", "train.sample_tokens=0",
              "checkpoint.every=0", "checkpoint.layout_free_every=0", "log.every=1", "log.tensorboard=false",
              "log.progress=false", f"train.precision={precision}", "train.threads=1"]
    reference, layout_run = [*common, *ONE_DEVICE], [*common, *(f"{k}={v}" for k, v in layout.items())]
    try:
        cfg, _ = load_run_config(config, reference, world_size=1)
    except ConfigError as err:
        raise ConfigError(f"the one-device reference of {config} is not a valid run: {err}") from None
    try:
        load_run_config(config, layout_run, world_size=ranks)
    except ConfigError as err:
        raise ConfigError(f"--layout {layout_text} ({ranks} ranks) is not a valid run of {config}: {err}") from None
    floor = other_split(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    return Runs(reference, layout_run, ranks, floor, visible_gpus(cfg.train.device))


class Progress:
    """'parity: run 2 (layout tensor=2, 2 ranks): step 7 of 20' on stderr (rewritten in place on a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.what = ""

    def start(self, what: str) -> None:
        self.what = what
        self._show(f"parity: {what}: starting")

    def line(self, text: str) -> None:
        match = STEP_LINE.match(text)
        if match:
            self._show(f"parity: {self.what}: step {match[1]} of {match[2]}")

    def _show(self, text: str) -> None:
        print(f"\r\033[K{text}" if self.tty else text, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _train(launch: Launch, progress: Progress, cmd: list[str], what: str, capture: int | None = None,
           tensor: tuple[str, str, int] | None = None) -> None:
    """Run one training; `capture`: the step it records as fingerprints, `tensor`: the record it also keeps whole
    (`bigtrain.train.capture`)."""
    from bigtrain.train.capture import CAPTURE_ENV, TENSOR_ENV

    progress.start(what)
    env = {CAPTURE_ENV: str(capture)} if capture else {}
    if tensor is not None:
        env[TENSOR_ENV] = " ".join(map(str, tensor))
    status, lines = launch.run(cmd, progress.line, env)
    if status != 0:
        tail = [line for line in lines if line.startswith("bigtrain:")][-3:]
        raise ConfigError(f"the {what} run failed (status {status}): " + (" ".join(tail) or "\n".join(lines[-10:])))


def parity(config: Path, layout_text: str, steps: int = 20, shrink: bool = False, precision: str = "fp32",
           overrides: list[str] | None = None, work_dir: Path | None = None, script: Path | None = None,
           locate: bool = False) -> tuple[list[StepDiff], Verdict, Located | None]:
    """Train `steps` steps of `config` on one process and under the layout (and, when needed, the noise floor's
    one-process run); the per-step differences, the verdict and, with `locate`, where the layout first differs
    (`parity_locate`: step 1 is recorded in both runs; the step the layout leaves the noise floor, when later,
    is recorded again in one more run of each). `script`: a training script to run instead of `bigtrain train`
    (tests)."""
    if locate and parse_layout(layout_text).get("parallel.expert", "1") != "1":
        raise ConfigError(f"--locate with --layout {layout_text} is refused: it does not gather expert-parallel "
                          f"gradients (each rank's routed experts) yet. Leave out --locate, or locate with expert=1 "
                          f"and the other sizes of the layout.")
    checked = check_runs(config, layout_text, steps, shrink, precision, list(overrides or []))
    check_local_ranks(checked.ranks, f"--layout {layout_text} needs {checked.ranks} ranks",
                      "Choose a layout with fewer ranks (--shrink keeps the model small, not the rank count), or "
                      "run it on a machine with room for them (e.g. a GPU node: one rank per GPU).", checked.gpus)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bigtrain-parity-"))
    program = [str(script)] if script is not None else TRAIN  # after `python`; torchrun takes `-m` the same way
    args = [*program, "--config", str(config)]
    progress = Progress()
    first = 1 if locate else None
    located = None
    with Launch(temporary=[] if work_dir else [work]) as launch:
        _train(launch, progress, [*launch.torchrun(checked.ranks), *args, *checked.layout,
                                  f"run.dir={work / 'layout'}"], f"run 1 (layout {layout_text}, {checked.ranks} ranks)",
               first)
        _train(launch, progress, [sys.executable, *args, *checked.reference, f"run.dir={work / 'reference'}"],
               "run 2 (one device)", first)
        diffs = compare(work / "reference", work / "layout")
        if not within_tolerance(diffs, TOLERANCE[precision]) and checked.floor_micro is not None:
            _train(launch, progress, [sys.executable, *args, *checked.reference,
                                      f"train.micro_batch_size={checked.floor_micro}", f"run.dir={work / 'floor'}"],
                   f"run 3 (noise floor: one device, micro-batches of {checked.floor_micro})")
            diffs = compare(work / "reference", work / "layout", work / "floor")
        verdict = judge(diffs, TOLERANCE[precision])
        if locate:
            located = _locate(launch, progress, checked, args, layout_text, work, verdict.first_out or 1,
                              LOCATE_TOLERANCE[precision])
        progress.done()
    return diffs, verdict, located


def _both(launch: Launch, progress: Progress, checked: Runs, args: list[str], layout_text: str, work: Path,
          name: str, step: int, what: str, key: tuple[str, str, int] | None = None) -> tuple[Path, Path]:
    """One more run of each side trained to `step` and recording it (into work/NAME-reference, work/NAME-layout)."""
    ref, lay = work / f"{name}-reference", work / f"{name}-layout"
    _train(launch, progress, [*launch.torchrun(checked.ranks), *args, *checked.layout, f"train.steps={step}",
                              f"run.dir={lay}"], f"locate (layout {layout_text}, {what})", step, key)
    _train(launch, progress, [sys.executable, *args, *checked.reference, f"train.steps={step}", f"run.dir={ref}"],
           f"locate (one device, {what})", step, key)
    return ref, lay


def _locate(launch: Launch, progress: Progress, checked: Runs, args: list[str], layout_text: str, work: Path,
            at: int, tolerance: float) -> Located:
    """Where the layout first differs at step `at` (recorded by runs 1 and 2 when it is step 1), and that record's
    whole tensors (kept by one more run of each side)."""
    found = (work / "reference", work / "layout")
    if at > 1:
        found = _both(launch, progress, checked, args, layout_text, work, "locate", at, f"recording step {at}")
    located = locate_step(*found, tolerance)
    if located.diverged:
        key = located.differences[0].key
        ref, lay = _both(launch, progress, checked, args, layout_text, work, "tensors", at, f"keeping {key[1]} whole",
                         key)
        located.detail = compare_tensors(ref, lay, tolerance)
    return located


def report(diffs: list[StepDiff], verdict: Verdict, layout: str, tolerance: float) -> str:
    """The table of the runs side by side (with the noise floor's differences when it ran) and the verdict."""
    floor = any(d.floor for d in diffs)
    head = f"{'step':>5} {'loss (one device)':>18} {'loss (layout)':>16} {'rel':>9} {'grad_norm rel':>14}"
    lines = [head + (f" {'floor rel':>10} {'floor grad_norm rel':>20}" if floor else "")]
    for d in diffs:
        row = f"{d.step:>5} {d.loss[0]:>18.6f} {d.loss[1]:>16.6f} {d.rel('loss'):>9.1e} {d.rel('grad_norm'):>14.1e}"
        if floor:
            row += f" {d.floor_rel('loss'):>10.1e} {d.floor_rel('grad_norm'):>20.1e}"
        mark = ("  <- leaves the noise floor" if d.step == verdict.first_out else
                "  <- grad_norm outside at this step alone" if d.step in verdict.isolated else "")
        lines.append(row + mark)
    measure = (f"{NOISE_FACTOR:g}x the noise floor (a one-device run on other micro-batches), at least {tolerance:.0e}"
               if floor else f"the tolerance {tolerance:.0e}")
    for step, ratio in verdict.isolated.items():
        lines.append(f"note: grad_norm at step {step} alone is {ratio:.3g}x what is allowed, inside again at the next "
                     f"step: one ill-conditioned step, not counted (docs/parity.md)")
    if verdict.passed:
        noted = ", ".join(map(str, verdict.isolated))
        but = f" but grad_norm at step {noted} (noted)" if noted else ""
        lines.append(f"parity PASSED: largest relative difference {verdict.worst:.1e} over {len(diffs)} steps, within "
                     f"{measure} at every step{but} ({layout})")
    else:
        step, key = verdict.first_out, verdict.first_key
        first = next(d for d in diffs if d.step == step)
        lines.append(f"parity FAILED: the layout leaves {measure} at step {step}: {key} differs by "
                     f"{first.rel(key):.1e} where {verdict.allowed[step][key]:.1e} is allowed (largest relative "
                     f"difference {verdict.worst:.1e}, {verdict.worst_ratio:.3g}x what is allowed; {layout})")
    return "\n".join(lines)


def run_parity(argv: list[str]) -> int:
    parser = CommandParser(prog="bigtrain parity", description="Train a config under a layout and on one device on "
                           "the same batches (dropout off) and compare loss and grad_norm step by step, against the "
                           "noise floor of fp32 rounding (docs/parity.md).")
    parser.add_argument("--config", type=path, required=True)
    parser.add_argument("--layout", required=True, help="e.g. tensor=2,pipeline=2,zero_stage=1 (keys: tensor, "
                        "pipeline, data, zero_stage, sequence_parallel)")
    parser.add_argument("--steps", type=whole, default=20)
    parser.add_argument("--shrink", action="store_true", help="scale the model down, keeping the layout valid")
    parser.add_argument("--precision", default="fp32", help="fp32 (tolerance 1e-5) or bf16 (2e-2)")
    parser.add_argument("--work-dir", type=path, help="where the runs go (default: a temporary folder, removed)")
    parser.add_argument("--locate", action="store_true", help="also record one step of both runs module by "
                        "module and print where the layout first differs (docs/parity.md)")
    parser.add_argument("--script", type=path, help=argparse.SUPPRESS)  # tests: a training script with a fault
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse(argv)

    def command() -> int:
        diffs, verdict, located = parity(args.config, args.layout, args.steps, args.shrink, args.precision,
                                         args.overrides, args.work_dir, args.script, args.locate)
        print(report(diffs, verdict, args.layout, TOLERANCE[args.precision]))
        if located is not None:
            print(locate_report(located))
        return 0 if verdict.passed else 1

    return run_guarded(command, args.debug, {"--work-dir": args.work_dir})
