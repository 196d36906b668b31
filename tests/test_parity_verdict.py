"""`bigtrain parity` without training (issue 25): the noise-floor verdict on measured and synthetic curves, the
noise floor's micro-batch split, and the checks that run before any process starts (a layout the config refuses,
a repeated layout key). The runs themselves: tests/test_parity_command.py."""

from __future__ import annotations

import pytest

from bigtrain.cli.parity import other_split, parse_layout, report
from bigtrain.cli.parity_verdict import NOISE_FACTOR, StepDiff, judge
from bigtrain.errors import ConfigError
from tests.conftest import REPO, run_cli

SMOKE = str(REPO / "configs" / "smoke.yaml")


def curve(ref: list[float], layout: list[float], floor: list[float] | None = None) -> list[StepDiff]:
    """Steps whose loss and grad_norm are both `ref` / `layout` / `floor` (the same relative differences)."""
    return [StepDiff(i + 1, (r, g), (r, g), {"loss": f, "grad_norm": f} if floor else {})
            for i, (r, g, f) in enumerate(zip(ref, layout, floor or ref, strict=True))]


def drift(rate: float, start: float, steps: int = 30) -> list[float]:
    """Values 3.0 * (1 + start * rate**k): a difference that starts at `start` and grows geometrically."""
    return [3.0 * (1 + start * rate**k) for k in range(steps)]


def test_drift_within_the_noise_floor_passes_where_the_fixed_tolerance_fails():
    """The newcomer's case: layout and floor both drift from 1e-7 to ~1e-2 over 30 steps (the smoke config's
    amplification); the layout 3x the floor. A fixed 1e-5 fails it; the floor passes it."""
    ref = [3.0] * 30
    diffs = curve(ref, drift(1.5, 3e-7), drift(1.5, 1e-7))
    assert max(d.rel("loss") for d in diffs) > 1e-2
    assert not judge(curve(ref, drift(1.5, 3e-7)), 1e-5).passed
    verdict = judge(diffs, 1e-5)
    assert verdict.passed and verdict.first_out is None
    assert verdict.worst_ratio == pytest.approx(3 / NOISE_FACTOR, rel=1e-3)


def test_a_broken_layout_fails_at_its_first_step_whatever_the_floor():
    """A rank on the wrong batch: 1e-2 from step 1 while the floor is 1e-7 (tests/helpers/broken_parity.py)."""
    ref = [3.0] * 10
    diffs = curve(ref, [3.03] * 10, drift(1.5, 1e-7, 10))
    verdict = judge(diffs, 1e-5)
    assert not verdict.passed and verdict.first_out == 1 and verdict.first_key == "loss"
    assert "parity FAILED: the layout leaves 100x the noise floor" in report(diffs, verdict, "data=2", 1e-5)
    assert "at step 1: loss differs by 1.0e-02 where 1.0e-05 is allowed" in report(diffs, verdict, "data=2", 1e-5)


def test_the_first_step_outside_the_floor_is_reported():
    """Within the floor for 10 steps, then 1000x it: the verdict names step 11 and marks it in the table."""
    ref, floor = [3.0] * 20, drift(1.5, 1e-7, 20)
    layout = [f if k < 10 else 3.0 + 1000 * (f - 3.0) for k, f in enumerate(floor)]
    diffs = curve(ref, layout, floor)
    verdict = judge(diffs, 1e-5)
    assert not verdict.passed and verdict.first_out == 11
    table = report(diffs, verdict, "tensor=2", 1e-5)
    assert [line for line in table.splitlines() if "<- leaves the noise floor" in line][0].split()[0] == "11"


def test_the_floor_is_its_running_maximum_and_the_tolerance_a_minimum():
    """A floor that comes out near zero at one step by chance does not shrink what is allowed there; below the
    tolerance nothing fails."""
    diffs = curve([3.0] * 3, [3.0 + 3e-4, 3.0 + 3e-4, 3.0 + 3e-4], [3.0 + 3e-5, 3.0, 3.0])
    verdict = judge(diffs, 1e-5)
    assert verdict.passed and verdict.allowed[3]["loss"] == pytest.approx(NOISE_FACTOR * 1e-5)
    assert judge(curve([3.0] * 3, [3.0 + 2e-5] * 3, [3.0] * 3), 1e-5).passed


@pytest.mark.parametrize("batch,micro,split", [(32, 32, 16), (32, 16, 8), (9, 3, 1), (8, 1, 2), (7, 1, 7),
                                               (1, 1, None)])
def test_the_noise_floor_splits_the_batch_otherwise(batch, micro, split):
    assert other_split(batch, micro) == split


def test_a_layout_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="'tensor' is given twice \\(2 and 4\\); give each key once"):
        parse_layout("tensor=2,tensor=4")




@pytest.mark.parametrize("layout,message", [
    ("data=2,zero_stage=7", "--layout data=2,zero_stage=7 (2 ranks) is not a valid run of"),
    ("tensor=3", "--layout tensor=3 (3 ranks) is not a valid run of"),
    ("tensor=2,tensor=4", "'tensor' is given twice"),
])
def test_a_layout_the_run_would_refuse_is_refused_before_anything_starts(no_process_may_start, layout, message):
    """Issue 25: zero_stage=7 was refused only after the reference had trained."""
    proc = run_cli("parity", "--config", SMOKE, "--layout", layout, "train.micro_batch_size=16")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain:")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert no_process_may_start == []
