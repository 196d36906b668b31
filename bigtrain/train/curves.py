"""The curves of one or several runs, read from their `metrics.jsonl` and drawn on shared axes (`bigtrain plot`).

A run's metrics.jsonl holds one line per logged step (`step`, `loss`, `lr`, `grad_norm`, `tokens`,
`tokens_per_s`, ...) and one per evaluation (`step`, `eval_loss`, ...). A resumed run appends the steps it trains
again after its checkpoint, so a step logged twice is taken from its last line: what the run that went on
computed. Each panel draws one quantity against the step (or the tokens seen), one line per run; the data drawn
is stored in the PNG itself (a text chunk `bigtrain-curves`, JSON), so what a picture shows can be read back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bigtrain.errors import UsageError

PANELS = (("loss", "loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"),
          ("tokens_per_s", "tokens/s"))
CHUNK = "bigtrain-curves"


@dataclass
class Curves:
    """One run's series: key -> [(step, value)] sorted by step, and the tokens seen at each training step."""

    name: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)

    def x(self, step: int, axis: str) -> float:
        return float(step if axis == "step" else self.tokens.get(step, 0))


def read_curves(run_dir: Path, name: str | None = None) -> Curves:
    """The series of `run_dir`'s metrics.jsonl (a run.dir, or the metrics file itself)."""
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UsageError(f"{run_dir}: no metrics.jsonl there; give the run.dir of a run that has logged a step.")
    by_key: dict[str, dict[int, float]] = {key: {} for key, _ in PANELS}
    tokens: dict[int, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{path}:{number} is not a metrics line ({error}); the file is written by `bigtrain "
                             f"train`, one JSON object with a step per line.") from None
        for key in by_key:
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                by_key[key][step] = float(value)
        if isinstance(record.get("tokens"), int):
            tokens[step] = record["tokens"]
    series = {key: sorted(values.items()) for key, values in by_key.items() if values}
    if not series:
        raise UsageError(f"{path} has no loss, eval loss, learning rate, grad norm or tokens/s to draw yet.")
    return Curves(name or (run_dir.name if run_dir.is_dir() else run_dir.parent.name), series, tokens)


def distinct_names(paths: list[Path]) -> list[str]:
    """Short labels for the runs: their folder names, with as many parent folders as tell them apart."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > max(len(p.resolve().parts) for p in paths):
            return names
        depth += 1


def plotted(runs: list[Curves], axis: str) -> dict:
    """What the picture draws: panel -> run -> [[x, value], ...] (also stored in the PNG)."""
    return {"x": axis, "panels": {key: {run.name: [[run.x(s, axis), v] for s, v in run.series[key]]
                                        for run in runs if key in run.series}
                                  for key, _ in PANELS if any(key in run.series for run in runs)}}


def draw_curves(runs: list[Curves], out: Path, axis: str = "step", dpi: float = 100) -> dict:
    """Draw every panel that some run has into the PNG `out`; returns what was drawn (`plotted`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = plotted(runs, axis)
    panels = [(key, title) for key, title in PANELS if key in data["panels"]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels, strict=True):
        for name, points in data["panels"][key].items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        ax.set_ylabel(title)
        values = [v for pts in data["panels"][key].values() for _, v in pts]
        if key in ("loss", "eval_loss") and min(values) > 0 and max(values) > 3 * min(values):
            ax.set_yscale("log")  # a loss that falls by a factor: its late steps stay readable
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    axes[-1, 0].set_xlabel("step" if axis == "step" else "tokens seen")
    fig.tight_layout()
    fig.savefig(out, dpi=dpi, format="png", metadata={CHUNK: json.dumps(data)})
    plt.close(fig)
    return data


def read_back(png: Path) -> dict:
    """The data a picture of `draw_curves` was drawn from."""
    from PIL import Image

    with Image.open(png) as image:
        return json.loads(image.text[CHUNK])
