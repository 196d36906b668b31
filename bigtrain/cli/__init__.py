"""The commands: `bigtrain train | prepare | consolidate | evaluate | export | convert | attention | generate |
eval-harness | parity | plan | plot` (`python launch/train.py` is `bigtrain train`). Each command lives in the
module `COMMANDS` names, as `run_<command>(argv) -> exit status` (eval-harness: `run_eval_harness`), imported when
it runs (so `bigtrain plan` never imports DeepSpeed).
Every command ends a failure with one paragraph and an exit status (`report.py`)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

COMMANDS = {"train": "bigtrain.cli.train", "prepare": "bigtrain.cli.prepare", "consolidate": "bigtrain.cli.tools",
            "evaluate": "bigtrain.cli.tools", "export": "bigtrain.cli.tools", "convert": "bigtrain.cli.tools",
            "attention": "bigtrain.cli.attention", "generate": "bigtrain.cli.generate",
            "eval-harness": "bigtrain.cli.eval_harness", "parity": "bigtrain.cli.parity",
            "plan": "bigtrain.cli.plan", "plot": "bigtrain.cli.plot"}

USAGE = f"usage: bigtrain {{{','.join(COMMANDS)}}} ...\n" + """\
  train --config FILE [--print-config] [--help-config] [--world-size N [--gpu-memory GiB]] [--allow-changes KEY,...] \
[--verbose] [--debug] [section.key=value ...]
  prepare --config FILE [--workers N] [--shard-mb MB] [--verify] [--debug] [section.key=value ...]
  consolidate RUN_DIR [--step N] [--out DIR] [--debug]
  evaluate RUN_DIR|CHECKPOINT|WEIGHTS_DIR [--step N] [--debug] [section.key=value ...]
  export RUN_DIR|CHECKPOINT [--step N] --format safetensors|hf --out DIR [--debug]
  convert RUN_DIR|CHECKPOINT [--step N] [--debug]
  attention RUN_DIR|CHECKPOINT|WEIGHTS_DIR [--step N] --text TEXT --out FILE.png [--target TEXT] \
[--kind all|self|encoder|decoder|cross] [--layers I,J] [--heads I,J] [--dpi N] [--debug]
  generate RUN_DIR|CHECKPOINT|WEIGHTS_DIR [--step N] --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] \
[--greedy | --temperature T --top-k K --top-p P | --beams B --length-penalty A] [--seed S] [--no-cache] [--debug]
  eval-harness RUN_DIR|CHECKPOINT|WEIGHTS_DIR [--step N] --tasks T[,T ...] [--limit N] [--include-path DIR] \
[--num-fewshot K] [--batch-size B] [--output FILE.json] [--debug] [section.key=value ...]
  parity --config FILE --layout tensor=T,pipeline=P,data=D,zero_stage=Z [--steps N] [--shrink] [--locate] \
[--precision fp32|bf16] [--work-dir DIR] [--debug] [section.key=value ...]
  plan --config FILE --gpus N [--gpus-per-node G] [--gpu NAME] [--gpu-memory GiB [--peak-tflops T]] \
[--intra-node-gbps GB/s] [--inter-node-gbps GB/s] [--efficiency E] [--framework-gib GiB] [--top K] [--json] \
[--debug] [section.key=value ...]
  plot RUN_DIR [RUN_DIR ...] --out FILE.png [--x step|tokens] [--dpi N] [--debug]"""


def command(name: str) -> Callable[[list[str]], int]:
    """The function that runs command `name`."""
    return getattr(importlib.import_module(COMMANDS[name]), f"run_{name.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in COMMANDS:
        try:
            return command(name)(rest)
        except SystemExit as stop:  # argparse's --help, and bad arguments (cli/arguments.py): a status like any other
            return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    print(f"bigtrain: error: unknown command '{name}'. Available: {', '.join(COMMANDS)}.", file=sys.stderr)
    return 2
