"""The commands: `bigtrain train | prepare | consolidate | evaluate | export | convert | attention | generate | parity
| plan` (`python launch/train.py` is `bigtrain train`).
Every command ends a failure with one paragraph and an exit status (`report.py`)."""

from __future__ import annotations

import sys

from bigtrain.cli.attention import run_attention
from bigtrain.cli.generate import run_generate
from bigtrain.cli.parity import run_parity
from bigtrain.cli.plan import run_plan
from bigtrain.cli.prepare import run_prepare
from bigtrain.cli.tools import run_consolidate, run_convert, run_evaluate, run_export
from bigtrain.cli.train import run_train

COMMANDS = {"train": run_train, "prepare": run_prepare, "consolidate": run_consolidate, "evaluate": run_evaluate,
            "export": run_export, "convert": run_convert, "attention": run_attention, "generate": run_generate,
            "parity": run_parity, "plan": run_plan}

__all__ = ["COMMANDS", "main", "run_attention", "run_consolidate", "run_convert", "run_evaluate", "run_export",
           "run_generate", "run_parity", "run_plan", "run_prepare", "run_train"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bigtrain {train,prepare,consolidate,evaluate,export,convert,attention,generate,parity,plan} ...\n"
              "  train --config FILE [--print-config] [--allow-changes KEY,...] [--debug] [section.key=value ...]\n"
              "  prepare --config FILE [--workers N] [--shard-mb MB] [--verify] [--debug] [section.key=value ...]\n"
              "  consolidate RUN_DIR [--step N] [--out DIR] [--debug]\n"
              "  evaluate RUN_DIR|CHECKPOINT|WEIGHTS_DIR [--debug] [section.key=value ...]\n"
              "  export RUN_DIR|CHECKPOINT --format safetensors|hf --out DIR [--debug]\n"
              "  convert RUN_DIR|CHECKPOINT [--debug]\n"
              "  attention RUN_DIR|CHECKPOINT|WEIGHTS_DIR --text TEXT --out FILE.png [--target TEXT] "
              "[--kind all|self|encoder|decoder|cross] [--layers I,J] [--heads I,J] [--dpi N] [--debug]\n"
              "  generate RUN_DIR|CHECKPOINT|WEIGHTS_DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] "
              "[--greedy | --temperature T --top-k K --top-p P | --beams B --length-penalty A] [--seed S] "
              "[--no-cache] [--debug]\n"
              "  parity --config FILE --layout tensor=T,pipeline=P,data=D,zero_stage=Z [--steps N] [--shrink] "
              "[--precision fp32|bf16] [section.key=value ...]\n"
              "  plan --config FILE --gpus N [--gpus-per-node G] [--gpu NAME | --gpu-memory GiB --peak-tflops T] "
              "[--efficiency E] [--top K] [--json] [section.key=value ...]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        return COMMANDS[command](rest)
    print(f"bigtrain: error: unknown command '{command}'. Available: {', '.join(COMMANDS)}.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
