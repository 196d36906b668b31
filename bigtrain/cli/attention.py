"""`bigtrain attention`: draw the attention maps of a text through a trained model as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from bigtrain.cli.report import run_guarded

KINDS = ("all", "self", "encoder", "decoder", "cross")


def run_attention(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bigtrain attention", description="Draw the attention maps (a grid of layers x heads, token labels "
        "on the axes) of a text through a trained model, on one device, as a PNG (docs/attention_maps.md).")
    parser.add_argument("checkpoint", type=Path,
                        help="a run.dir (its latest checkpoint), a checkpoint folder, or a folder written by "
                             "`bigtrain export` or `bigtrain consolidate`")
    parser.add_argument("--text", required=True, help="the input (seq2seq: the source)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG file to write (its folder must exist)")
    parser.add_argument("--target", help="seq2seq: the decoder input after bos (default: bos alone)")
    parser.add_argument("--kind", choices=KINDS, default="all",
                        help="causal/masked: self; seq2seq: encoder, decoder (self-attention) or cross; all "
                             "(default): every kind of the model, one block of rows each")
    parser.add_argument("--layers", metavar="I,J,...", help="layer indices to draw, e.g. 0,2 (default: all)")
    parser.add_argument("--heads", metavar="I,J,...", help="head indices to draw, e.g. 0,1 (default: all)")
    parser.add_argument("--dpi", type=float, default=100, help="pixels per inch of the PNG (default 100)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse_args(argv)

    def command() -> int:
        from bigtrain.inference.attention_command import attention_png, parse_indices

        picture = attention_png(args.checkpoint, args.text, args.out, args.target, args.kind,
                                parse_indices("--layers", args.layers), parse_indices("--heads", args.heads),
                                args.dpi)
        print(picture.describe())
        return 0

    return run_guarded(command, args.debug)
