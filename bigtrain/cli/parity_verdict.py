"""The verdict of `bigtrain parity` (docs/parity.md): does the layout stay as close to one device as fp32 rounding
lets two correct computations stay?

Two correct ways of computing the same step sum in different orders and round differently (~1e-7 relative in
fp32); training amplifies such differences step by step (on the smoke config from 1e-7 at step 1 to 1e-4 in loss
and 1e-3 in grad_norm by step 20), so a fixed tolerance fails correct layouts on real configs. The noise floor is
measured instead: a second one-device run whose global batch is split into other micro-batches (`other_split`) —
the same mathematics, another summation order — and the layout is judged against how far that run drifts from
the reference:

    rel(s)      = |layout(s) - reference(s)| / |reference(s)|       at each step s, for loss and for grad_norm
    floor(s)    = max over t <= s of |floor run(t) - reference(t)| / |reference(t)|
    allowed(s)  = max(tolerance, NOISE_FACTOR * floor(s))
    PASSED  iff  rel(s) <= allowed(s) at every step, for both

The floor is the running maximum: the drift grows roughly geometrically but a single step of it may come out near
zero by chance. NOISE_FACTOR = 100, from measurements (smoke config, 30 steps, docs/parity.md): correct layouts
reach up to 25x the floor (TP=2 18x, DP=2 ZeRO-1 25x; 12x and 11x with the one-device grad_norm computed in
float64 as the layouts compute theirs): they change other sums than the micro-batch split does (every matmul
under TP), and grad_norm at a single step swings widely. Meanwhile a layout that computes something else (a rank on
the wrong batch, a missing reduction, a wrong scale) differs by 1e-2 or more from its first step, where the floor is
1e-7: 1e5x. 100 also keeps the ratio of the fixed tolerance to one step's fp32 rounding (1e-5 to 1e-7): at the
first steps, where the floor is that rounding, the tolerance decides as before; only once training has amplified
the rounding does the allowance grow with it. The run of the floor is needed only when the layout is outside the
tolerance somewhere: else the verdict is the same without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bigtrain.errors import ConfigError

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
NOISE_FACTOR = 100.0
KEYS = ("loss", "grad_norm")


def relative(ref: float, got: float) -> float:
    return abs(got - ref) / abs(ref) if ref else abs(got - ref)


@dataclass
class StepDiff:
    """One step's values: the reference's, the layout's and (when it ran) the noise-floor run's."""

    step: int
    loss: tuple[float, float]
    grad_norm: tuple[float, float]
    floor: dict[str, float] = field(default_factory=dict)

    def rel(self, key: str) -> float:
        ref, got = getattr(self, key)
        return relative(ref, got)

    def floor_rel(self, key: str) -> float | None:
        return relative(getattr(self, key)[0], self.floor[key]) if key in self.floor else None


def read_steps(run_dir: Path) -> dict[int, dict]:
    """The training lines of run_dir/metrics.jsonl by step."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record
    return out


def compare(ref_dir: Path, run_dir: Path, floor_dir: Path | None = None) -> list[StepDiff]:
    ref, got = read_steps(ref_dir), read_steps(run_dir)
    floor = read_steps(floor_dir) if floor_dir is not None else {}
    if sorted(ref) != sorted(got) or (floor and sorted(floor) != sorted(ref)):
        raise ConfigError(f"the runs logged different steps ({sorted(ref)} vs {sorted(got)}).")
    return [StepDiff(s, (ref[s]["loss"], got[s]["loss"]), (ref[s]["grad_norm"], got[s]["grad_norm"]),
                     {k: floor[s][k] for k in KEYS} if floor else {}) for s in sorted(ref)]


def within_tolerance(diffs: list[StepDiff], tolerance: float) -> bool:
    return all(d.rel(k) <= tolerance for d in diffs for k in KEYS)


@dataclass
class Verdict:
    passed: bool
    allowed: dict[int, dict[str, float]]  # step -> key -> the largest difference allowed there
    first_out: int | None  # the first step where the layout leaves what is allowed
    first_key: str | None  # which value left there (loss or grad_norm)
    worst: float  # the largest relative difference of the layout, over steps and keys
    worst_ratio: float  # the largest rel(s) / allowed(s)


def judge(diffs: list[StepDiff], tolerance: float, factor: float = NOISE_FACTOR) -> Verdict:
    """The verdict of the module docstring (without floor values: the tolerance alone)."""
    envelope = dict.fromkeys(KEYS, 0.0)
    allowed: dict[int, dict[str, float]] = {}
    first_out, first_key, worst_ratio = None, None, 0.0
    for d in diffs:
        allowed[d.step] = {}
        for key in KEYS:
            floor = d.floor_rel(key)
            envelope[key] = max(envelope[key], floor or 0.0)
            limit = allowed[d.step][key] = max(tolerance, factor * envelope[key])
            worst_ratio = max(worst_ratio, d.rel(key) / limit)
            if d.rel(key) > limit and first_out is None:
                first_out, first_key = d.step, key
    worst = max((d.rel(k) for d in diffs for k in KEYS), default=0.0)
    return Verdict(first_out is None, allowed, first_out, first_key, worst, worst_ratio)
