"""`bigtrain train --config FILE [section.key=value ...]`, the same as `python launch/train.py`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

import bigtrain.config as config_package
from bigtrain.cli.arguments import CommandParser, finite, path, whole
from bigtrain.cli.capacity import first_on_this_machine, launched_ranks_refusal
from bigtrain.cli.console import resilient_stdout
from bigtrain.cli.lifetime import die_with_launcher
from bigtrain.cli.report import BAD_INPUT, fail
from bigtrain.config import Config, dump_config
from bigtrain.config.schema import key_name
from bigtrain.errors import UsageError

if typing.TYPE_CHECKING:
    from bigtrain.train.preemption import StopRequest

# configs/smoke.yaml, which the package carries (bigtrain/config/smoke.yaml links to it; a wheel holds a copy).
SMOKE_CONFIG = str(Path(config_package.__file__).with_name("smoke.yaml"))


def config_help() -> str:
    """Every key with its type, default and help text."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        obj = section.default_factory()
        if not dataclasses.is_dataclass(obj):  # the free-form deepspeed: passthrough
            lines.append(f"  {section.metadata.get('help', '')}")
            continue
        lines += _key_lines(obj, section.name)
    return "\n".join(lines)


def _key_lines(obj: object, prefix: str) -> list[str]:
    """`prefix.key = default  [type]` and its help, for every key of the section `obj` (a nested section, such as
    log.mlflow, as its help line and then its own keys)."""
    lines, hints = [], typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), key_name(f)
        if dataclasses.is_dataclass(value):
            lines.append(f"  {prefix}.{key}:\n      {f.metadata.get('help', '')}")
            lines += _key_lines(value, f"{prefix}.{key}")
            continue
        lines.append(f"  {prefix}.{key} = {value!r}  [{hints[f.name]}]\n      {f.metadata.get('help', '')}")
    return lines


def train_parser(prog: str) -> CommandParser:
    parser = CommandParser(prog=prog, description="Train a Transformer with bigtrain.")
    parser.add_argument("--config", type=path, help=f"YAML config file (default: {SMOKE_CONFIG})")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--world-size", type=whole, metavar="N",
                        help="check the job on N ranks without launching: the config and layout, the data paths, "
                             "each rank's memory plan (a dry run from a login node); with --print-config, print it too")
    parser.add_argument("--gpu-memory", type=finite, metavar="GiB",
                        help="with --world-size: refuse a layout whose ranks need more than this much memory")
    parser.add_argument("--allow-changes", metavar="KEY,...",
                        help="resume even though these config keys differ from the checkpoint's (e.g. train.seed); "
                             "recorded in metrics.jsonl")
    parser.add_argument("--verbose", action="store_true", help="print everything at start (log.verbose=true)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, before, between or after the options")
    return parser


def run_train(argv: list[str], prog: str = "bigtrain train") -> int:
    die_with_launcher()  # first of all, before torch: a rank started by a launcher dies with it (cli/lifetime.py)
    refusal = launched_ranks_refusal()  # the launcher started more ranks than this machine holds (cli/capacity.py)
    if refusal:
        if first_on_this_machine():  # one paragraph per machine, not one per rank
            print(f"bigtrain: error: {refusal}", file=sys.stderr, flush=True)
        return BAD_INPUT
    args = train_parser(prog).parse(argv)
    if args.help_config:
        print(config_help())
        return 0
    from bigtrain.train.preemption import StopRequest

    stop = StopRequest().install()  # from the start: a signal during start-up stops after the first step
    try:
        with resilient_stdout():  # a closed stdout drops console output; training goes on
            return _train(args, stop)
    finally:
        stop.uninstall()


def _train(args: argparse.Namespace, stop: StopRequest) -> int:
    """Detect the launcher, load the config, train; the exit status (2: bad input, 3 / 143: stopped by a signal)."""
    from bigtrain.train.preemption import exit_status

    rank, world = 0, 1  # until the launcher's environment is read (no collective can be waiting before that)
    started = False  # before training starts, every rank reads the same input and meets the same error
    try:
        from bigtrain.checkpoint.compare import parse_allowed
        from bigtrain.distributed import detect_env

        env = detect_env()
        rank, world = env.rank, env.world_size
        from bigtrain.parallel.validate import load_run_config  # the file's keys, then the layout and engine checks

        if args.world_size is not None and args.world_size < 1:
            raise UsageError(f"--world-size {args.world_size}: give the number of ranks of the job, at least 1.")
        if args.gpu_memory is not None and (args.world_size is None or not args.gpu_memory > 0):
            raise UsageError(f"--gpu-memory {args.gpu_memory}: give a positive number of GiB, with --world-size N "
                             f"(the dry run it judges).")
        overrides = [*args.overrides, *(["log.verbose=true"] if args.verbose else [])]
        cfg, layout = load_run_config(args.config or SMOKE_CONFIG, overrides,
                                      world_size=args.world_size or env.world_size)
        allowed = parse_allowed(args.allow_changes)
        if args.print_config and env.is_main:
            print(dump_config(cfg), end="")
        if args.world_size is not None and env.is_main:
            from bigtrain.cli.dry_run import dry_run

            print(dry_run(cfg, layout, args.gpu_memory, allowed))
        if args.print_config or args.world_size is not None:
            return 0
        from bigtrain.train.trainer import train  # heavy imports only when training

        started = True
        result = train(cfg, env, stop, allowed, layout=layout)
    except Exception as err:  # every failure ends in one paragraph (and never a hang: see report.fail)
        if not stop.aborted:
            return fail(err, rank, world, debug=args.debug, everywhere=not started)
        aborted = True  # the second Ctrl-C landed inside a library (a save), which turned it into its own error
    except KeyboardInterrupt:
        aborted = True
    else:
        aborted = False
    if aborted:
        print(f"bigtrain: aborted by a second Ctrl-C: nothing new was saved. {stop.saved_note}", file=sys.stderr)
        return 130
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


if __name__ == "__main__":  # `python -m bigtrain.cli.train`: what `bigtrain parity` and launchers start
    sys.exit(run_train(sys.argv[1:]))
