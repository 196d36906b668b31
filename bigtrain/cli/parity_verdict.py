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
    outside(s)  = rel(s) > allowed(s)
    leaves at s iff  loss is outside at s,  or  grad_norm is outside at s and at s+1 (or s is the last step)
    PASSED  iff  the layout leaves nowhere

The floor is the running maximum: the drift grows roughly geometrically but a single step of it may come out near
zero by chance. NOISE_FACTOR = 100, from measurements (smoke config, 30 steps, docs/parity.md): correct layouts
reach up to 25x the floor in loss and in grad_norm at all steps but isolated ones (tensor=2 about 20x in both:
every matmul under TP sums in another order, more than the micro-batch split changes). A layout that computes
something else (a rank on the wrong batch, a missing reduction, a wrong scale) differs by 1e-2 or more from its
first step, where the floor is 1e-7: 1e5x. 100 also keeps the ratio of the fixed tolerance to one step's fp32
rounding (1e-5 to 1e-7): at the first steps, where the floor is that rounding, the tolerance decides as before;
only once training has amplified the rounding does the allowance grow with it.

grad_norm must stay outside for two steps in a row: one step's gradient can be ill-conditioned, so that the
drift both runs carry shows in its norm hundreds of times larger than at the steps around it (tensor=2 on the
smoke config, step 25: 2.1e-2 apart, 152x the floor's grad_norm, where steps 24 and 26 are 1.1e-3 and 1.2e-4 and
the loss stays at 25x; tests/fixtures/parity/smoke_tensor2_30steps.json). A wrong computation is outside at every
step, so it still fails at its first one; the loss, which every update feeds, is judged at each step alone. Such
isolated steps are reported (`Verdict.isolated`), not hidden. The run of the floor is needed only when the layout
is outside the tolerance somewhere: else the verdict is the same without it.
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
    worst_ratio: float  # the largest rel(s) / allowed(s), over the steps and values that count
    isolated: dict[int, float] = field(default_factory=dict)  # step -> rel / allowed of a lone grad_norm step


def allowance(diffs: list[StepDiff], tolerance: float, factor: float) -> dict[int, dict[str, float]]:
    """allowed(s) for each step and value: max(tolerance, factor * the floor's running maximum)."""
    envelope = dict.fromkeys(KEYS, 0.0)
    allowed: dict[int, dict[str, float]] = {}
    for d in diffs:
        for key in KEYS:
            envelope[key] = max(envelope[key], d.floor_rel(key) or 0.0)
        allowed[d.step] = {key: max(tolerance, factor * envelope[key]) for key in KEYS}
    return allowed


def judge(diffs: list[StepDiff], tolerance: float, factor: float = NOISE_FACTOR) -> Verdict:
    """The verdict of the module docstring (without floor values: the tolerance alone)."""
    allowed = allowance(diffs, tolerance, factor)
    ratio = {(d.step, key): d.rel(key) / allowed[d.step][key] for d in diffs for key in KEYS}
    steps = [d.step for d in diffs]
    isolated = {s: ratio[s, "grad_norm"] for i, s in enumerate(steps[:-1])
                if ratio[s, "grad_norm"] > 1 and ratio[steps[i + 1], "grad_norm"] <= 1}
    counted = {k: r for k, r in ratio.items() if not (k[1] == "grad_norm" and k[0] in isolated)}
    out = sorted((s, KEYS.index(key)) for (s, key), r in counted.items() if r > 1)
    first_out, first_key = (out[0][0], KEYS[out[0][1]]) if out else (None, None)
    worst = max((d.rel(k) for d in diffs for k in KEYS), default=0.0)
    return Verdict(first_out is None, allowed, first_out, first_key, worst, max(counted.values(), default=0.0),
                   isolated)
