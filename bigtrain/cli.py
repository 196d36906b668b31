"""Command line: `bigtrain train --config FILE [section.key=value ...]` (same as `python launch/train.py`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from bigtrain.config import Config, dump_config, load_config
from bigtrain.errors import BigtrainError

# The repository's configs/ (the package is installed editable from a checkout).
SMOKE_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


def config_help() -> str:
    """Every key with its type, default and help text."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        obj = section.default_factory()
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
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def run_train(argv: list[str], prog: str = "bigtrain train") -> int:
    args = train_parser(prog).parse_args(argv)
    if args.help_config:
        print(config_help())
        return 0
    try:
        cfg = load_config(args.config or SMOKE_CONFIG, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from bigtrain.train.trainer import train  # heavy imports only when training

        result = train(cfg)
    except BigtrainError as err:
        print(f"bigtrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bigtrain: interrupted; the latest complete checkpoint is kept and a re-run resumes from it.",
              file=sys.stderr)
        return 130
    if result.last_eval is not None:
        print(f"done: step {result.state.step}, eval_loss {result.last_eval['eval_loss']:.4f}, "
              f"run.dir {result.run_dir}")
    else:
        print(f"done: step {result.state.step} (nothing left to train), run.dir {result.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bigtrain train --config FILE [--print-config] [section.key=value ...]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return run_train(rest)
    print(f"bigtrain: error: unknown command '{command}'. Available: train.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
