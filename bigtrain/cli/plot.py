"""`bigtrain plot RUN_DIR [RUN_DIR ...] --out curves.png`: loss, eval loss, learning rate, grad norm and tokens/s
of one or several runs on shared axes (`bigtrain.train.curves`); for runs of a mixture of experts also their
expert load at their last logged step, experts × layers, in curves_moe_load.png beside it
(`bigtrain.train.moe_load`)."""

from __future__ import annotations

from pathlib import Path

from bigtrain.cli.arguments import CommandParser, finite, path
from bigtrain.cli.report import run_guarded
from bigtrain.errors import UsageError
from bigtrain.train.curves import PANELS, distinct_names, draw_curves, read_curves
from bigtrain.train.moe_load import read_moe_load, save_load

MIN_DPI, MAX_DPI = 20, 600


def moe_load_path(out: Path) -> Path:
    """Where the expert-load picture goes: `out`'s name with `_moe_load` before `.png`."""
    return out.with_name(f"{out.stem}_moe_load{out.suffix}")


def plot_runs(run_dirs: list[Path], out: Path, axis: str = "step", dpi: float = 100) -> dict:
    """Read every run, then draw them into `out`, and the expert load of the runs that have one into
    `moe_load_path(out)`; returns what was drawn (the curves' data, and under `moe_load` the load's)."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the picture is a PNG; give a file name ending in .png.")
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"--out {out}: give the path of a .png file in an existing folder.")
    if not MIN_DPI <= dpi <= MAX_DPI:
        raise UsageError(f"--dpi {dpi:g}: give {MIN_DPI} to {MAX_DPI} pixels per inch (100 is the default).")
    names = distinct_names(run_dirs)
    runs = [read_curves(d, name) for d, name in zip(run_dirs, names, strict=True)]
    data = draw_curves(runs, out, axis, dpi)
    loads = [load for d, name in zip(run_dirs, names, strict=True) if (load := read_moe_load(d, name)) is not None]
    if loads:
        data = {**data, "moe_load": save_load(loads, moe_load_path(out), dpi)}
    return data


def run_plot(argv: list[str]) -> int:
    parser = CommandParser(prog="bigtrain plot", description="Draw the loss, eval loss, learning rate, grad norm and "
                           "tokens/s of one or several runs against steps or tokens on shared axes, as one PNG, "
                           "and for mixture-of-experts runs their expert load (experts × layers at the last logged "
                           "step) as OUT_moe_load.png (the data drawn is stored in the PNGs; README.md).")
    parser.add_argument("runs", type=path, nargs="+", metavar="RUN_DIR",
                        help="run.dir folders (or their metrics.jsonl), one line per run in every panel")
    parser.add_argument("--out", type=path, required=True, help="the PNG file to write (its folder must exist); a "
                        "mixture-of-experts run adds OUT_moe_load.png beside it")
    parser.add_argument("--x", choices=("step", "tokens"), default="step",
                        help="the horizontal axis: the step (default) or the tokens seen")
    parser.add_argument("--dpi", type=finite, default=100, help="pixels per inch of the PNG (default 100)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse(argv)

    def command() -> int:
        data = plot_runs(args.runs, args.out, args.x, args.dpi)
        titles = dict(PANELS)
        panels = ", ".join(titles[key] for key in data["panels"])
        print(f"curves: {args.out} ({len(args.runs)} run{'s' * (len(args.runs) > 1)}; {panels} against "
              f"{args.x}s)")
        if "moe_load" in data:
            shown = ", ".join(f"{run['name']} step {run['step']}" for run in data["moe_load"]["runs"])
            print(f"expert load: {moe_load_path(args.out)} ({shown}; experts × MoE layers)")
        return 0

    return run_guarded(command, args.debug, {"--out": args.out})
