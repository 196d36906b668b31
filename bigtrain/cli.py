"""Command line: `bigtrain train --config FILE [section.key=value ...]` (same as `python launch/train.py`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from bigtrain.config import Config, dump_config
from bigtrain.errors import BigtrainError

if typing.TYPE_CHECKING:
    from bigtrain.train.preemption import StopRequest

# The repository's configs/ (the package is installed editable from a checkout).
SMOKE_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


def config_help() -> str:
    """Every key with its type, default and help text."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        obj = section.default_factory()
        if not dataclasses.is_dataclass(obj):  # the free-form deepspeed: passthrough
            lines.append(f"  {section.metadata.get('help', '')}")
            continue
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            lines.append(f"  {section.name}.{f.name} = {getattr(obj, f.name)!r}  [{hints[f.name]}]\n"
                         f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def train_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a Transformer with bigtrain.")
    parser.add_argument("--config", help=f"YAML config file (default: {SMOKE_CONFIG})")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def run_train(argv: list[str], prog: str = "bigtrain train") -> int:
    args = train_parser(prog).parse_args(argv)
    if args.help_config:
        print(config_help())
        return 0
    from bigtrain.train.preemption import StopRequest

    stop = StopRequest().install()  # from the start: a signal during start-up stops after the first step
    try:
        return _train(args, stop)
    finally:
        stop.uninstall()


def _train(args: argparse.Namespace, stop: StopRequest) -> int:
    """Detect the launcher, load the config, train; the exit status (2: bad input, 3 / 143: stopped by a signal)."""
    from bigtrain.train.preemption import exit_status

    rank, world = 0, 1  # until the launcher's environment is read (no collective can be waiting before that)
    try:
        from bigtrain.distributed import detect_env

        env = detect_env()
        rank, world = env.rank, env.world_size
        from bigtrain.engine.validate import load_run_config  # the file's keys, then the layout and engine checks

        cfg = load_run_config(args.config or SMOKE_CONFIG, args.overrides, world_size=env.world_size)
        if args.print_config:
            if env.is_main:
                print(dump_config(cfg), end="")
            return 0
        from bigtrain.train.trainer import train  # heavy imports only when training

        result = train(cfg, env, stop)
    except BigtrainError as err:
        return fail(f"{err}", rank, world, traceback_text=None)
    except KeyboardInterrupt:
        print("bigtrain: interrupted; the latest complete checkpoint is kept and a re-run resumes from it.",
              file=sys.stderr)
        return 130
    except Exception as err:  # a bug or an environment failure: keep the traceback, and never hang
        import traceback

        return fail(f"{type(err).__name__}: {err}", rank, world, traceback_text=traceback.format_exc())
    from bigtrain.distributed import shutdown_process_group

    shutdown_process_group()
    if result.stopped_by:
        if rank == 0:
            print(f"stopped: step {result.state.step} of {cfg.train.steps}, checkpoint saved; run the same command "
                  f"(same run.dir) to continue. run.dir {result.run_dir}", flush=True)
        return exit_status(result.stopped_by)
    if rank == 0:
        if result.last_eval is not None:
            print(f"done: step {result.state.step}, eval_loss {result.last_eval['eval_loss']:.4f}, "
                  f"run.dir {result.run_dir}")
        else:
            print(f"done: step {result.state.step} (nothing left to train), run.dir {result.run_dir}")
    return 0


def fail(message: str, rank: int, world_size: int, traceback_text: str | None) -> int:
    """Report an error and exit. With several ranks, exit the process at once (os._exit): the other ranks
    may be blocked in a collective that would otherwise keep this one waiting at interpreter shutdown; the
    launcher sees the non-zero status and stops them, and their next collective fails fast."""
    where = f"rank {rank}: " if world_size > 1 else ""
    if traceback_text:
        print(traceback_text, file=sys.stderr, end="")
    print(f"bigtrain: {where}error: {message}", file=sys.stderr, flush=True)
    if world_size > 1:
        import os

        sys.stdout.flush()
        os._exit(1)
    return 1 if traceback_text else 2


def run_consolidate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain consolidate",
                                     description="Gather a (ZeRO-sharded) checkpoint into one full set of weights.")
    parser.add_argument("run_dir", type=Path, help="the run.dir of the training run")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/consolidated/step_N)")
    args = parser.parse_args(argv)
    try:
        from bigtrain.engine.consolidate import consolidate

        out = consolidate(args.run_dir, args.step, args.out)
    except BigtrainError as err:
        return fail(str(err), 0, 1, traceback_text=None)
    print(f"consolidated weights: {out / 'model.pt'} (config: {out / 'config.yaml'})")
    return 0


def run_evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain evaluate",
                                     description="Held-out loss of consolidated weights on one device.")
    parser.add_argument("weights_dir", type=Path, help="a directory written by `bigtrain consolidate`")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        from bigtrain.train.evaluate import evaluate_weights

        result = evaluate_weights(args.weights_dir, args.overrides)
    except BigtrainError as err:
        return fail(str(err), 0, 1, traceback_text=None)
    print(json.dumps(result))
    return 0


COMMANDS = {"train": run_train, "consolidate": run_consolidate, "evaluate": run_evaluate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bigtrain {train,consolidate,evaluate} ...\n"
              "  train --config FILE [--print-config] [section.key=value ...]\n"
              "  consolidate RUN_DIR [--step N] [--out DIR]\n"
              "  evaluate WEIGHTS_DIR [section.key=value ...]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        return COMMANDS[command](rest)
    print(f"bigtrain: error: unknown command '{command}'. Available: {', '.join(COMMANDS)}.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
