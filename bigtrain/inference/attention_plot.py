"""Attention grids as one picture (matplotlib, Agg canvas: no display needed).

One panel per (kind, layer) row and head column, the query tokens down the side and the key tokens along the
bottom of each kind's rows; colours are attention probabilities on one scale for all panels, 0..1 with a square
root (`SCALE`: the near-uniform weights of a long row, 1/32, stay visible) and one colour bar.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from bigtrain.inference.attention_data import AttentionGrid

INCHES_PER_TOKEN = 0.12
MIN_PANEL = 1.5  # inches
MARGINS = (1.3, 1.1)  # inches of width (query labels, colour bar) and height (title, axis names)
KEY_LABELS = 0.7  # inches below each kind's last row for its key labels
MAX_TICKS = 64  # labels per axis; longer inputs label every n-th token
COLORMAP = "viridis"
SCALE = 0.5  # colour = probability ** SCALE
MIN_DPI = 10  # below, the picture collapses (constrained layout leaves no room for the panels)
MAX_SIDE = 2**16 - 1  # pixels; Agg draws nothing larger
MAX_PIXELS = 2**27  # 128 Mpx: 512 MiB as RGBA, which the canvas allocates at once


def panel_inches(grids: list[AttentionGrid]) -> float:
    tokens = max(max(len(g.queries), len(g.keys)) for g in grids)
    return max(MIN_PANEL, INCHES_PER_TOKEN * tokens)


def figure_size(grids: list[AttentionGrid]) -> tuple[float, float]:
    """(width, height) in inches: panels of `panel_inches` for rows = layers of every kind, columns = heads."""
    panel = panel_inches(grids)
    rows = sum(len(g.layers) for g in grids)
    cols = max(len(g.heads) for g in grids)
    return cols * panel + MARGINS[0], rows * panel + MARGINS[1] + KEY_LABELS * len(grids)


def largest_dpi(grids: list[AttentionGrid]) -> float:
    """The highest dpi whose picture of `grids` stays within MAX_SIDE pixels a side and MAX_PIXELS in all."""
    width, height = figure_size(grids)
    return min(MAX_SIDE / max(width, height), math.sqrt(MAX_PIXELS / (width * height)))


def draw(grids: list[AttentionGrid], title: str = "") -> Figure:
    """The figure of `grids` (each panel's image holds that head's [query, key] probabilities)."""
    if not grids or not all(g.layers and g.heads for g in grids):
        raise ValueError("draw needs at least one grid with at least one layer and one head")
    fig = Figure(figsize=figure_size(grids), layout="constrained")
    FigureCanvasAgg(fig)
    rows, cols = sum(len(g.layers) for g in grids), max(len(g.heads) for g in grids)
    axes = fig.subplots(rows, cols, squeeze=False)
    row, image = 0, None
    for grid in grids:
        for li, layer in enumerate(grid.layers):
            for hi, head in enumerate(grid.heads):
                ax = axes[row, hi]
                image = ax.imshow(grid.weights[li, hi], cmap=COLORMAP, norm=PowerNorm(SCALE, vmin=0.0, vmax=1.0),
                                  aspect="auto", interpolation="nearest")
                _ticks(ax, grid, first_col=hi == 0, last_row=li == len(grid.layers) - 1)
                if li == 0:
                    ax.set_title(f"head {head}", fontsize=8)
                if hi == 0:
                    name = "layer" if grid.kind == "self" else f"{grid.kind} layer"
                    ax.set_ylabel(f"{name} {layer}", fontsize=8)
            for hi in range(len(grid.heads), cols):
                axes[row, hi].set_axis_off()
            row += 1
    fig.colorbar(image, ax=axes, shrink=min(1.0, 4.0 / rows + 0.2), label="attention probability")
    fig.supylabel("query token", fontsize=9)
    fig.supxlabel("key token (attended to)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _ticks(ax, grid: AttentionGrid, first_col: bool, last_row: bool) -> None:
    size = 7 if max(len(grid.queries), len(grid.keys)) <= 16 else 6 if max(len(grid.queries), len(grid.keys)) <= 32 \
        else 5
    for labels, set_ticks, set_labels, shown, rotation in (
            (grid.queries, ax.set_yticks, ax.set_yticklabels, first_col, 0),
            (grid.keys, ax.set_xticks, ax.set_xticklabels, last_row, 90)):
        step = math.ceil(len(labels) / MAX_TICKS)
        positions = list(range(0, len(labels), step))
        set_ticks(positions)
        set_labels([labels[i] for i in positions] if shown else [], fontsize=size, rotation=rotation)


def save_png(fig: Figure, path: Path, dpi: float = 100) -> tuple[int, int]:
    """Write `fig` to `path` as a PNG of exactly figsize × dpi pixels; returns (width, height)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # a token the font cannot show: a box
        fig.savefig(path, dpi=dpi, format="png")
    width, height = fig.get_size_inches() * dpi
    return round(width), round(height)


def to_rgb(fig: Figure, dpi: float = 100, longest: int = 4096) -> np.ndarray:
    """The figure as an RGB array [height, width, 3] uint8 (for TensorBoard), its longest side at most
    `longest` pixels (the dpi is lowered for large models)."""
    dpi = min(dpi, longest / max(fig.get_size_inches()))
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
