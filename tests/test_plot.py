"""`bigtrain plot` (issue 31, item 5): the curves drawn are the runs' metrics, read back from the PNG, for one
and for three runs; a resumed run's repeated steps; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigtrain.cli import main
from bigtrain.train.curves import read_back


def write_run(folder: Path, steps: range, scale: float = 1.0, evals: tuple[int, ...] = (), resumed_at: int | None = None
              ) -> Path:
    """A run.dir whose metrics.jsonl has training lines for `steps` and evaluation lines at `evals`; with
    `resumed_at`, the steps after it are logged twice, the first time with other (lost) values."""
    folder.mkdir(parents=True)
    lines = []
    for step in steps:
        line = {"step": step, "loss": scale * 5 / step, "lr": 1e-3 * step, "grad_norm": scale * (1 + step % 3),
                "tokens": 64 * step, "tokens_per_s": 1000.0 + step, "mfu": None, "skipped": False}
        if resumed_at is not None and step > resumed_at:
            lines.append({**line, "loss": 99.0})
        lines.append(line)
        if step in evals:
            lines.append({"step": step, "eval_loss": scale * 6 / step, "eval_ppl": 1.0, "eval_tokens": 10})
    if resumed_at is not None:  # the lost lines come first, then the resumed run's: order as in a real file
        lost = [x for x in lines if x.get("loss") == 99.0]
        kept = [x for x in lines if x.get("loss") != 99.0]
        lines = [x for x in kept if x["step"] <= resumed_at] + lost + [x for x in kept if x["step"] > resumed_at]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_one_run_is_drawn_with_its_own_numbers(tmp_path, capsys):
    run = write_run(tmp_path / "runs" / "smoke", range(1, 11), evals=(5, 10))
    out = tmp_path / "curves.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert "curves:" in capsys.readouterr().out and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = read_back(out)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"):
        expected = [[float(m["step"]), m[key]] for m in metrics if key in m]
        assert data["panels"][key] == {"smoke": expected}, key


def test_three_runs_share_the_axes_and_a_resumed_run_is_drawn_from_its_last_lines(tmp_path):
    runs = [write_run(tmp_path / "a" / "run", range(1, 21)),
            write_run(tmp_path / "b" / "run", range(1, 21), scale=1.1, resumed_at=10),
            write_run(tmp_path / "c" / "run", range(1, 11), scale=0.9)]
    out = tmp_path / "curves.png"
    assert main(["plot", *map(str, runs), "--out", str(out), "--x", "tokens"]) == 0
    data = read_back(out)
    assert data["x"] == "tokens" and list(data["panels"]["loss"]) == ["a/run", "b/run", "c/run"]
    resumed = data["panels"]["loss"]["b/run"]
    assert len(resumed) == 20 and 99.0 not in [v for _, v in resumed]
    assert resumed[-1] == [64.0 * 20, pytest.approx(1.1 * 5 / 20)]
    assert data["panels"]["grad_norm"]["c/run"][0] == [64.0, pytest.approx(0.9 * 2)]
    assert "eval_loss" not in data["panels"]


@pytest.mark.parametrize("args,message", [
    (["{missing}", "--out", "{tmp}/c.png"], "no metrics.jsonl there"),
    (["{run}", "--out", "{tmp}/c.jpg"], "the picture is a PNG"),
    (["{run}", "--out", "{tmp}/nowhere/c.png"], "in an existing folder"),
    (["{run}", "--out", "{tmp}/c.png", "--dpi", "5000"], "--dpi 5000: give 20 to 600"),
    (["{broken}", "--out", "{tmp}/c.png"], "is not a metrics line"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    run = write_run(tmp_path / "run", range(1, 3))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    paths = {"missing": tmp_path / "missing", "tmp": tmp_path, "run": run, "broken": broken}
    assert main(["plot", *(a.format(**paths) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigtrain: error:") and message in err and "Traceback" not in err
