"""`bigtrain consolidate`, `evaluate`, `export` and `convert`: commands on a run's checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigtrain.cli.report import run_guarded


def run_consolidate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain consolidate",
                                     description="Gather a (ZeRO-sharded) checkpoint into one full set of weights.")
    parser.add_argument("run_dir", type=Path, help="the run.dir of the training run")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/consolidated/step_N)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse_args(argv)

    def command() -> int:
        from bigtrain.checkpoint.consolidate import consolidate

        out = consolidate(args.run_dir, args.step, args.out)
        print(f"consolidated weights: {out / 'model.pt'} (config: {out / 'config.yaml'})")
        return 0

    return run_guarded(command, args.debug)


def run_evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain evaluate",
                                     description="Held-out loss of consolidated weights on one device.")
    parser.add_argument("weights_dir", type=Path, help="a directory written by `bigtrain consolidate`")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse_args(argv)

    def command() -> int:
        from bigtrain.train.evaluate import evaluate_weights

        print(json.dumps(evaluate_weights(args.weights_dir, args.overrides)))
        return 0

    return run_guarded(command, args.debug)


def run_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigtrain export",
                                     description="Write a checkpoint's weights alone, for inference.")
    parser.add_argument("checkpoint", type=Path, help="a run.dir (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                        help="safetensors: model.safetensors + config.yaml (one-device layout); hf: a transformers "
                        "folder (config.json + model.safetensors + tokenizer.json) of GPT-2, Llama, BERT or T5")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse_args(argv)

    def command() -> int:
        if args.format == "hf":
            from bigtrain.interop import export_hf

            out = export_hf(args.checkpoint, args.out)
            print(f"exported: {out} (transformers: config.json + model.safetensors)")
            return 0
        from bigtrain.checkpoint.weights import export_safetensors

        out = export_safetensors(args.checkpoint, args.out)
        print(f"exported: {out / 'model.safetensors'} (config: {out / 'config.yaml'})")
        return 0

    return run_guarded(command, args.debug)


def run_convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bigtrain convert", description="Add the layout-free form to a checkpoint written without it, so that "
        "it can be resumed under any layout (loads it with as many local ranks as wrote it).")
    parser.add_argument("checkpoint", type=Path, help="a run.dir (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse_args(argv)

    def command() -> int:
        from bigtrain.checkpoint.convert import run_convert as convert

        checkpoint = convert(args.checkpoint)
        print(f"layout-free form: {checkpoint / 'layout_free'}")
        return 0

    return run_guarded(command, args.debug)
