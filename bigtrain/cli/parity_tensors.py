"""The whole tensors of the one record `bigtrain parity --locate` found first, rebuilt from the layout's pieces and
compared value by value with one device's (after the fingerprints: only this record's tensors are ever kept).

Each rank of a run that `BIGTRAIN_CAPTURE_TENSOR` named the record to (`bigtrain.train.capture`) wrote its part
to capture/tensors-rankNNNNN.pt:

    a parameter's weight, gradient or update   its pieces (box in the whole tensor, flat range of the box): each
                                               box is filled from its ranges, then put in its place
    a module's output or its gradient          this rank's tensor of the micro-batch (its calls summed): the
                                               tensor ranks' tensors joined along the dimension that one device's
                                               shape is T times larger in (or tensor rank 0's when it is whole),
                                               the pipeline stages' summed; under context parallelism each
                                               context rank's share is so joined, and the shares, in rank-major
                                               order, put back in the sequence's order (`reorder_to_natural`)

The gradient is divided by the run's clipping coefficient, an output's gradient by the engine's backward scale,
as for the fingerprints (`parity_locate`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bigtrain.cli.parity_locate import context_share
from bigtrain.errors import ConfigError
from bigtrain.parallel.context.sharding import reorder_to_natural


def _load(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted((run_dir / "capture").glob("tensors-rank*.pt"))
    if not files:
        raise ConfigError(f"{run_dir} has no capture/tensors-rank*.pt (was BIGTRAIN_CAPTURE_TENSOR set?).")
    return [torch.load(f, weights_only=True) for f in files]


def _parameter(ranks: list[dict[str, Any]]) -> torch.Tensor | None:
    pieces = [(r, p) for r in ranks for p in r["tensors"]]
    if not pieces:
        return None
    shape = [max(int(p["box"][k][1]) for _, p in pieces) for k in range(len(pieces[0][1]["box"]))]
    whole = torch.zeros(shape, dtype=torch.float64)
    boxes: dict[tuple, torch.Tensor] = {}
    for r, p in pieces:
        box = tuple(tuple(int(v) for v in b) for b in p["box"])
        flat = boxes.setdefault(box, torch.zeros(int(torch.tensor([b - a for a, b in box]).prod()),
                                                 dtype=torch.float64))
        scale = 1.0 / r["clip_coef"] if r["wanted"][0] == "gradient" else 1.0
        flat[p["start"]:p["stop"]] = p["data"].reshape(-1) * scale
    for box, flat in boxes.items():
        whole[tuple(slice(a, b) for a, b in box)] = flat.reshape([b - a for a, b in box])
    return whole


def _join_tensor_ranks(parts: list[tuple[int, torch.Tensor]], shape: list[int] | None) -> torch.Tensor | None:
    """One tensor of `shape` from its tensor ranks' parts: tensor rank 0's when it is whole, else the parts joined
    along the one dimension they are cut in."""
    parts = sorted(parts, key=lambda rt: rt[0])
    local = list(parts[0][1].shape)
    if shape is None or local == shape:
        return parts[0][1]
    cut = [k for k, (a, b) in enumerate(zip(local, shape, strict=False)) if a != b]
    if len(local) != len(shape) or len(cut) != 1:
        return None
    return torch.cat([t for _, t in parts], dim=cut[0])


def join_activation(ranks: list[dict[str, Any]], shape: list[int] | None) -> torch.Tensor | None:
    """One module's output (or its gradient) of one device's `shape` from the ranks' kept tensors (module
    docstring); None when they are no cut of it."""
    held: dict[tuple[int, int], dict[int, list[tuple[int, torch.Tensor]]]] = defaultdict(lambda: defaultdict(list))
    for r in ranks:
        for t in r["tensors"]:
            scale = 1.0 / r["backward_scale"] if r["wanted"][0] == "backward" else 1.0
            held[r["pipe"], r["data"]][r.get("context", 0)].append((r["tensor"], t["data"] * scale))
    total = None
    for by_context in held.values():
        first = by_context[min(by_context)]
        share = (context_share(list(first[0][1].shape), shape, {"context_size": ranks[0].get("context_size", 1)})
                 if shape is not None else None)
        if share is None:  # every context rank holds it whole (or there is no context parallelism)
            part = _join_tensor_ranks(first, shape)
        else:  # the context ranks' zig-zag shares in rank-major order, put back in the sequence's order
            shares = [_join_tensor_ranks(by_context[c], share) for c in sorted(by_context)]
            if any(t is None or list(t.shape) != share for t in shares):
                return None
            part = reorder_to_natural(torch.cat(shares, dim=-2), len(shares), dim=len(share) - 2)
        if part is None:
            return None
        total = part if total is None else total + part
    return total


def whole_tensor(run_dir: Path, shape: list[int] | None = None) -> torch.Tensor | None:
    """The wanted record's whole tensor of a run (`shape`: one device's, to tell how an activation is cut)."""
    ranks = _load(run_dir)
    if ranks[0]["wanted"][0] in ("weight", "gradient", "update"):
        return _parameter(ranks)
    return join_activation(ranks, shape)


def compare_tensors(reference_dir: Path, layout_dir: Path, tolerance: float) -> str:
    """One line: where and by how much the layout's whole tensor differs from one device's."""
    ref = whole_tensor(reference_dir)
    if ref is None:
        return "full tensors: one device did not keep the record"
    got = whole_tensor(layout_dir, list(ref.shape))
    if got is None or got.shape != ref.shape:
        return (f"full tensors: the layout's pieces do not rebuild one device's shape {list(ref.shape)}"
                + (f" (got {list(got.shape)})" if got is not None else ""))
    delta = (got - ref).abs()
    largest = int(delta.argmax()) if delta.numel() else 0
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(largest), ref.shape)) if ref.dim() else ()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    off = int((delta > tolerance * scale).sum())
    norm = float(ref.norm())
    return (f"full tensors {list(ref.shape)}: largest |difference| {float(delta.max()):.3g} at {list(where)} "
            f"(layout {float(got.reshape(-1)[largest]):.6g}, one device {float(ref.reshape(-1)[largest]):.6g}); "
            f"|difference| / |one device| {float(delta.norm()) / norm if norm else float(delta.norm()):.2e}; "
            f"{off} of {ref.numel()} values differ by more than {tolerance:.0e} x max|value|")
