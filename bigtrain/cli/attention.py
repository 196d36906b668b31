"""`bigtrain attention`: the attention maps of a text through a trained model, drawn as one PNG.

The model reads --text (causal, masked: the input; seq2seq: the source, ended by eos as in training); a seq2seq
decoder reads bos + --target (default: bos alone). Every kind of attention of the family is drawn unless --kind
picks one (`attention_data.KINDS`); --layers and --heads pick subsets by index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.cli.arguments import CommandParser, finite, path, text, whole
from bigtrain.cli.report import run_guarded
from bigtrain.errors import UsageError
from bigtrain.inference.attention_data import KINDS, AttentionGrid, group, record, token_labels
from bigtrain.inference.attention_plot import MAX_PIXELS, MAX_SIDE, MIN_DPI, draw, figure_size, largest_dpi, save_png
from bigtrain.inference.load import LoadedModel, load_model


@dataclass
class AttentionPicture:
    """What `attention_png` wrote."""

    path: Path
    width: int
    height: int
    grids: list[AttentionGrid]

    def describe(self) -> str:
        kinds = ", ".join(f"{g.kind}: {len(g.layers)} layers x {len(g.heads)} heads, {len(g.queries)}x{len(g.keys)} "
                          f"tokens" for g in self.grids)
        return f"attention maps: {self.path} ({self.width}x{self.height} px; {kinds})"


def parse_indices(option: str, text: str | None) -> list[int] | None:
    """'0,2' -> [0, 2] (None: all)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise UsageError(f"{option} {text!r}: give indices (0, 1, ...) separated by commas, e.g. {option} 0,2.")
    return list(dict.fromkeys(values))


def check_out(out: Path) -> None:
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the picture is a PNG; give a file name ending in .png.")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the path of a .png file.")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist; create it or choose another path.")


def attention_png(path: Path, text: str, out: Path, target: str | None = None, kind: str = "all",
                  layers: list[int] | None = None, heads: list[int] | None = None, dpi: float = 100,
                  overrides: list[str] | None = None, step: int | None = None) -> AttentionPicture:
    """Draw the attention maps of `text` through the weights at `path` (a run.dir: its checkpoint of `step`,
    default the latest; a checkpoint or weights folder) into the PNG `out`."""
    check_out(out)
    if not dpi >= MIN_DPI:
        raise UsageError(f"--dpi {dpi:g}: give at least {MIN_DPI} pixels per inch (100 is the default).")
    loaded = load_model(path, overrides, step)
    family = loaded.cfg.model.family
    kinds = _kinds(family, kind)
    if target is not None and family != "seq2seq":
        raise UsageError(f"--target is the decoder input of a seq2seq model, but this model is {family}; "
                         f"leave --target out.")
    inputs, labels = _inputs(loaded, text, target)
    grids = [g for g in group(record(loaded.model, inputs), family, labels) if g.kind in kinds]
    grids = [_select(g, layers, heads) for g in grids]
    _check_dpi(grids, dpi)
    size = save_png(draw(grids, _title(path, text, target)), out, dpi)
    return AttentionPicture(out, *size, grids)


def _check_dpi(grids: list[AttentionGrid], dpi: float) -> None:
    """The picture must be one the canvas can allocate (a huge --dpi ended in std::bad_alloc)."""
    if dpi <= largest_dpi(grids):
        return
    width, height = (round(side * dpi) for side in figure_size(grids))
    raise UsageError(f"--dpi {dpi:g} would draw a {width:,} x {height:,} pixel picture; a PNG is drawn at most "
                     f"{MAX_SIDE:,} pixels a side and {MAX_PIXELS / 1e6:.0f} million pixels in all, which this "
                     f"figure reaches at --dpi {int(largest_dpi(grids)):,}. Use a lower --dpi (100 is the default), "
                     f"or fewer --layers / --heads.")


def _kinds(family: str, kind: str) -> list[str]:
    allowed = list(KINDS[family])
    if kind == "all":
        return allowed
    if kind not in allowed:
        raise UsageError(f"--kind {kind}: a {family} model has {' and '.join(allowed)} attention; use "
                         f"--kind {' or '.join([*allowed, 'all'])}.")
    return [kind]


def _inputs(loaded: LoadedModel, text: str, target: str | None
            ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The model's inputs for one sample, and the token labels of its input (and decoder) side."""
    tok, limit = loaded.tokenizer, loaded.cfg.model.max_seq_len
    ids = tok.encode(text)
    if not ids:
        raise UsageError("--text is empty: give the text whose attention to draw.")
    sides = {"input": (ids, "--text")}
    if loaded.cfg.model.family == "seq2seq":
        sides = {"input": ([*ids, tok.eos_id], "--text"),
                 "target": ([tok.bos_id, *tok.encode(target or "")], "--target")}
    for side, option in sides.values():
        if len(side) > limit:
            raise UsageError(f"{option} is {len(side)} tokens long but the model takes at most model.max_seq_len="
                             f"{limit}; shorten the text.")
    tensors = {name: torch.tensor([side], device=loaded.device) for name, (side, _) in sides.items()}
    inputs = {"input_ids": tensors["input"]}
    if "target" in tensors:
        inputs["decoder_input_ids"] = tensors["target"]
    return inputs, {name: token_labels(tok, side) for name, (side, _) in sides.items()}


def _select(grid: AttentionGrid, layers: list[int] | None, heads: list[int] | None) -> AttentionGrid:
    stack = "the model" if grid.kind == "self" else f"the {grid.kind} attention"
    for option, asked, present, what in (("--layers", layers, grid.layers, "layers"),
                                         ("--heads", heads, grid.heads, "heads")):
        missing = [i for i in asked or [] if i not in present]
        if missing:
            raise UsageError(f"{option}: {stack} has no {what[:-1]} {missing[0]}: it has {len(present)} {what}, "
                             f"0 to {len(present) - 1}.")
    return grid.select(layers, heads)


def _title(path: Path, text: str, target: str | None) -> str:
    shown = text if len(text) <= 40 else text[:39] + "…"
    extra = "" if target is None else f" -> {target[:20]!r}"
    return f"{path.name}: {shown!r}{extra}"


CHOICES = ("all", "self", "encoder", "decoder", "cross")


def run_attention(argv: list[str]) -> int:
    parser = CommandParser(
        prog="bigtrain attention", description="Draw the attention maps (a grid of layers x heads, token labels "
        "on the axes) of a text through a trained model, on one device, as a PNG (docs/attention_maps.md).")
    parser.add_argument("checkpoint", type=path,
                        help="a run.dir (its latest checkpoint), a checkpoint folder, or a folder written by "
                             "`bigtrain export` or `bigtrain consolidate`")
    parser.add_argument("--step", type=whole, metavar="N",
                        help="the checkpoint of step N of a run.dir (default: the latest)")
    parser.add_argument("--text", type=text, required=True, help="the input (seq2seq: the source)")
    parser.add_argument("--out", type=path, required=True, help="the PNG file to write (its folder must exist)")
    parser.add_argument("--target", type=text, help="seq2seq: the decoder input after bos (default: bos alone)")
    parser.add_argument("--kind", choices=CHOICES, default="all",
                        help="causal/masked: self; seq2seq: encoder, decoder (self-attention) or cross; all "
                             "(default): every kind of the model, one block of rows each")
    parser.add_argument("--layers", metavar="I,J,...", help="layer indices to draw, e.g. 0,2 (default: all)")
    parser.add_argument("--heads", metavar="I,J,...", help="head indices to draw, e.g. 0,1 (default: all)")
    parser.add_argument("--dpi", type=finite, default=100, help="pixels per inch of the PNG (default 100)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse(argv)

    def command() -> int:
        picture = attention_png(args.checkpoint, args.text, args.out, args.target, args.kind,
                                parse_indices("--layers", args.layers), parse_indices("--heads", args.heads),
                                args.dpi, step=args.step)
        print(picture.describe())
        return 0

    return run_guarded(command, args.debug, {"--out": args.out})
