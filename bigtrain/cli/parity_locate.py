"""`bigtrain parity --locate`: where does the layout first compute something else than one device?

Both runs record one step as fingerprints (`bigtrain.train.capture`, `bigtrain.train.fingerprint`); here the
layout's ranks' fingerprints are combined into those of the whole tensors and compared with the reference's, in
the order one device computes them:

    weight     every parameter before the step                                  (parameter order)
    forward    micro-batch m: every module's output                             (execution order), then
    backward   micro-batch m: the gradient of every module's output             (execution order), m = 0, 1, ...
               (divided by the engine's `backward_scale`: D · ℓ is backpropagated under D-way data parallelism)
    gradient   every parameter's gradient after the layout's reductions, before clipping (both runs' clipping
               coefficients undone)
    update     what the optimizer changed in every parameter

Combining, for a parameter: the sum over the ranks (each value of it lies in exactly one rank's piece). For an
activation of micro-batch m of data rank d (micro-batch d · M + m of the global batch, M micro-batches per rank,
as `TrainingData` cuts it), summed over pipeline stages (a module runs on one stage):

    the tensor ranks hold it whole          (its shape is one device's)       tensor rank 0's fingerprint
    cut along dimension k into T parts      (shape[k] · T = one device's)      Σ over tensor ranks, positions
                                                                                offset along k (last: feature
                                                                                cut; the one before: sequence cut)

Under context parallelism (C > 1) an activation whose sequence (the dimension before the last) is C times shorter
than one device's is each context rank's zig-zag share (chunks c and 2C-1-c of 2C): within a context rank its
tensor ranks are combined as above into the share (with the sequence cut of sequence parallelism taken inside
the share), with positions at the tokens' global places ("ctx:" prints, `bigtrain.train.fingerprint`), and the
shares are summed over the context ranks. One that every context rank holds whole (its sequence as long as one
device's) is context rank 0's.

A record is beyond the tolerance when `difference` (the largest relative difference of its sums, norm and
positional checksums) exceeds it; the first such record in the order above is where the layout leaves one
device, the next three show how it spreads.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigtrain.errors import ConfigError
from bigtrain.train.fingerprint import add, difference, scaled

PHASES = {"weight": 0, "forward": 1, "backward": 1, "gradient": 2, "update": 3}
WHAT = {"weight": "weight (before the step)", "forward": "forward (its output)",
        "backward": "backward (the gradient of its output)", "gradient": "gradient (after reductions, before "
        "clipping)", "update": "update (what the optimizer changed)"}
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}

Key = tuple[str, str, int]  # phase, name, micro-batch of the global batch (-1 for parameters)


@dataclass
class Capture:
    """One run's fingerprints, combined over its ranks (parameters) or by rank (activations)."""

    step: int
    params: dict[Key, list[float]] = field(default_factory=dict)
    activations: dict[Key, list[tuple[dict[str, Any], dict[str, Any]]]] = field(default_factory=dict)
    order: dict[Key, tuple[int, int, int, int]] = field(default_factory=dict)


def read_capture(run_dir: Path) -> Capture:
    files = sorted((run_dir / "capture").glob("rank*.json"))
    if not files:
        raise ConfigError(f"{run_dir} has no capture/rank*.json: the run did not record its step (was "
                          f"BIGTRAIN_CAPTURE_STEP set, and did the run reach that step?).")
    ranks = [json.loads(f.read_text()) for f in files]
    out = Capture(step=ranks[0]["step"])
    for meta in ranks:
        for seq, r in enumerate(meta["records"]):
            phase = r["phase"]
            if phase in ("weight", "gradient", "update"):
                key = (phase, r["name"], -1)
                values = scaled(r["print"], 1.0 / meta["clip_coef"]) if phase == "gradient" else r["print"]
                out.params[key] = add(out.params[key], values) if key in out.params else values
                out.order.setdefault(key, (PHASES[phase], 0, 0, seq))
            else:
                micro = meta["data"] * meta["micro_batches"] + r["micro"]
                key = (phase, r["name"], micro)
                if phase == "backward":
                    r = {**r, "prints": {k: scaled(v, 1.0 / meta["backward_scale"]) for k, v in r["prints"].items()}}
                out.activations.setdefault(key, []).append((meta, r))
                out.order.setdefault(key, (1, micro, 0 if phase == "forward" else 1, seq))
    return out


Record = tuple[dict[str, Any], dict[str, Any]]  # a rank's meta and its record of one activation


def context_share(local: list[int], shape: list[int], meta: dict[str, Any]) -> list[int] | None:
    """One context rank's share of one device's `shape` (the sequence, the dimension before the last, over C)
    when the ranks' `local` shape is cut along it by context parallelism; None when it is not."""
    size = meta.get("context_size", 1)
    if size == 1 or len(local) != len(shape) or len(shape) < 2 or local[-2] == shape[-2] or shape[-2] % size:
        return None
    return [*shape[:-2], shape[-2] // size, shape[-1]]


def _tensor_ranks(held: list[Record], shape: list[int], prefix: str) -> list[float] | None:
    """The fingerprint of `shape` (one device's, or one context rank's share of it) from its tensor ranks."""
    held = sorted(held, key=lambda mr: mr[0]["tensor"])
    local = held[0][1]["shape"]
    if local == shape:
        return held[0][1]["prints"].get(prefix + "whole")
    size = held[0][0]["tensor_size"]
    cut = [k for k, (a, b) in enumerate(zip(local, shape, strict=False)) if a != b]
    if len(local) != len(shape) or len(cut) != 1 or local[cut[0]] * size != shape[cut[0]]:
        return None
    kind = "last" if cut[0] == len(shape) - 1 else "seq" if cut[0] == len(shape) - 2 else "whole"
    part = None
    for _, r in held:
        mine = r["prints"].get(prefix + kind)
        if mine is None:
            return None
        part = mine if part is None else add(part, mine)
    return part


def whole_activation(records: list[Record], shape: list[int]) -> list[float] | None:
    """The fingerprint of the whole activation of one device's `shape` from the layout's ranks' records (module
    docstring); None when the ranks' shapes are no cut of it."""
    total: list[float] | None = None
    stages: dict[tuple[int, int], list[Record]] = defaultdict(list)
    for meta, r in records:
        stages[meta["pipe"], meta["data"]].append((meta, r))
    for held in stages.values():
        by_context: dict[int, list[Record]] = defaultdict(list)
        for meta, r in held:
            by_context[meta.get("context", 0)].append((meta, r))
        share = context_share(held[0][1]["shape"], shape, held[0][0])
        if share is None:  # every context rank holds it whole (or there is no context parallelism)
            part = _tensor_ranks(by_context[min(by_context)], shape, "")
        else:  # Σ over the context ranks' zig-zag shares, each at its global positions
            part = None
            for mine in by_context.values():
                got = _tensor_ranks(mine, share, "ctx:")
                if got is None:
                    return None
                part = got if part is None else add(part, got)
        if part is None:
            return None
        total = part if total is None else add(total, part)
    return total


@dataclass
class Finding:
    key: Key
    difference: float
    reference: list[float]
    layout: list[float] | None

    def describe(self) -> str:
        phase, name, micro = self.key
        where = f" of micro-batch {micro}" if micro >= 0 else ""
        if self.layout is None:
            return f"{name}: {WHAT[phase]}{where}: not computed by the layout (or not rebuilt from its shards)"
        ref_norm, got_norm = max(self.reference[2], 0.0) ** 0.5, max(self.layout[2], 0.0) ** 0.5
        return (f"{name}: {WHAT[phase]}{where}: differs by {self.difference:.1e} (norm {got_norm:.6g} where one "
                f"device has {ref_norm:.6g}; sum {self.layout[1]:.6g} vs {self.reference[1]:.6g})")


@dataclass
class Located:
    step: int
    tolerance: float
    compared: int
    differences: list[Finding]  # beyond the tolerance, in execution order
    largest: Finding | None  # the largest difference within the tolerance (when none is beyond)
    detail: str | None = None  # the first record's whole tensors compared (`parity_tensors`), when they were kept

    @property
    def diverged(self) -> bool:
        return bool(self.differences)


def locate(reference_dir: Path, layout_dir: Path, tolerance: float) -> Located:
    """Compare the layout's capture with the reference's (module docstring)."""
    ref, got = read_capture(reference_dir), read_capture(layout_dir)
    if ref.step != got.step:
        raise ConfigError(f"the captures are of different steps ({ref.step} and {got.step}).")
    findings: list[Finding] = []
    for key in sorted(ref.order, key=lambda k: ref.order[k]):
        if key in ref.params:
            mine, theirs = ref.params[key], got.params.get(key)
        else:
            (_, r), = ref.activations[key]
            mine = r["prints"]["whole"]
            theirs = whole_activation(got.activations[key], r["shape"]) if key in got.activations else None
        findings.append(Finding(key, difference(mine, theirs) if theirs is not None else float("inf"), mine,
                                theirs))
    beyond = [f for f in findings if not f.difference <= tolerance]
    within = [f for f in findings if f.difference <= tolerance]
    return Located(ref.step, tolerance, len(findings), beyond,
                   max(within, key=lambda f: f.difference) if within else None)


def locate_report(found: Located) -> str:
    if not found.diverged:
        largest = f"; largest {found.largest.difference:.1e}, {found.largest.describe()}" if found.largest else ""
        return (f"locate: no divergence at step {found.step}: {found.compared} fingerprints (weights, every "
                f"module's output and its gradient, gradients, updates) agree within {found.tolerance:.0e}{largest}")
    first, *rest = found.differences
    lines = [f"locate: first divergence at step {found.step} (tolerance {found.tolerance:.0e}): "
             f"{first.describe()}"]
    if found.detail:
        lines.append(f"  {found.detail}")
    lines += [f"  then {f.describe()}" for f in rest[:3]]
    lines.append(f"  ({len(found.differences)} of {found.compared} fingerprints beyond the tolerance)")
    return "\n".join(lines)
