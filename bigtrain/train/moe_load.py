"""The expert load of a mixture-of-experts run as a picture: experts down, MoE layers across, each cell the share
of that layer's top-k assignments (before the capacity limit) that went to that expert:

    share[e, l] = assigned[l][e] / Σ_e' assigned[l][e']      each column sums to 1; 1/E everywhere is balanced

Drawn from a training line's `moe_layers` (metrics.jsonl; `bigtrain.engine.result.MoELayers`): by `bigtrain plot`
from a run's last such line, next to its curves, and into TensorBoard's images at every log step
(`MetricsProcessor`). The PNG carries the shares it shows (a text chunk `bigtrain-moe-load`: `read_back`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = "bigtrain-moe-load"
TAG = "moe_load"  # the TensorBoard image
COLORMAP = "viridis"
ANNOTATE_CELLS = 256  # panels with at most this many cells print each share in its cell


@dataclass(frozen=True)
class MoELoad:
    """One step's load of one run: `shares` [experts][layers] (`layers`: each MoE layer's block)."""

    name: str
    step: int
    layers: list[str]
    shares: list[list[float]]


def load_of(name: str, step: int, moe_layers: dict[str, dict[str, Any]]) -> MoELoad:
    """The shares of a training line's `moe_layers` (a layer without assignments: 0 everywhere)."""
    layers = list(moe_layers)
    columns = []
    for layer in layers:
        assigned = moe_layers[layer]["assigned"]
        total = sum(assigned)
        columns.append([a / total if total else 0.0 for a in assigned])
    return MoELoad(name, step, layers, [list(row) for row in zip(*columns, strict=True)])


def read_moe_load(run_dir: Path, name: str | None = None) -> MoELoad | None:
    """The load of the last training line of `run_dir`'s metrics.jsonl (a run.dir, or the file itself) that has
    `moe_layers`; None for a run without one (a dense model). Lines that are not JSON objects are passed over
    (`bigtrain.train.curves.read_curves` reports them)."""
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("moe_layers"), dict) and record["moe_layers"]:
            last = record
    if last is None:
        return None
    return load_of(name or (run_dir.name if run_dir.is_dir() else run_dir.parent.name), int(last["step"]),
                   last["moe_layers"])


def draw_load(loads: list[MoELoad]):
    """One heatmap panel per run (experts × layers, one colour scale from 0 to the largest share) and one colour
    bar: a matplotlib Figure on an Agg canvas (no display needed; matplotlib is imported here, by what draws)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not loads or not all(load.layers and load.shares for load in loads):
        raise ValueError("draw_load needs at least one run with at least one MoE layer")
    experts = max(len(load.shares) for load in loads)
    layers = max(len(load.layers) for load in loads)
    panel_width, panel_height = max(2.5, 0.45 * layers + 1.0), max(2.0, 0.3 * experts + 0.8)
    fig = Figure(figsize=(max(5.0, panel_width * len(loads) + 1.5), panel_height + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(loads), squeeze=False)[0]
    top = max(max(max(row) for row in load.shares) for load in loads)
    image = None
    for ax, load in zip(axes, loads, strict=True):
        shares = np.asarray(load.shares)
        image = ax.imshow(shares, cmap=COLORMAP, vmin=0.0, vmax=max(top, 1e-12), aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(load.layers)), load.layers, rotation=90, fontsize=7)
        ax.set_yticks(range(len(load.shares)), [str(e) for e in range(len(load.shares))], fontsize=7)
        ax.set_xlabel("MoE layer", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.set_title(f"{load.name}: step {load.step} (balanced {1 / len(load.shares):.1%})", fontsize=8)
        if shares.size <= ANNOTATE_CELLS:
            for (e, l), share in np.ndenumerate(shares):
                ax.text(l, e, f"{100 * share:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if share > 0.6 * top else "white")
    fig.colorbar(image, ax=list(axes)).set_label("share of the layer's assignments", fontsize=8)
    fig.suptitle("expert load: % of each MoE layer's top-k assignments (before drops)", fontsize=9)
    return fig


def save_load(loads: list[MoELoad], out: Path, dpi: float = 100) -> dict:
    """Draw `loads` into the PNG `out`; returns the data drawn (also stored in the PNG)."""
    data = {"runs": [asdict(load) for load in loads]}
    draw_load(loads).savefig(out, dpi=dpi, format="png", metadata={CHUNK: json.dumps(data)})
    return data


def read_back(png: Path) -> dict:
    """The data a picture of `save_load` was drawn from."""
    from PIL import Image

    with Image.open(png) as image:
        return json.loads(image.text[CHUNK])


def load_image(load: MoELoad) -> np.ndarray:
    """The picture of one step's load as RGB [height, width, 3] uint8 (TensorBoard)."""
    from bigtrain.inference.attention_plot import to_rgb

    return to_rgb(draw_load([load]))
