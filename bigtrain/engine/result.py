"""What one optimizer step reports, whatever engine ran it.

An engine may leave `loss`, `grad_norm`, `finite`, `skipped` and `nonfinite_rank` on the device (0-dim
tensors): reading them synchronizes the host with the device, so the trainer reads them only when a log line, a
checkpoint or an evaluation needs them (`resolve_all`: one transfer for any number of pending steps). A deferred
`nonfinite_rank` holds the rank, or -1 for none.

A mixture-of-experts model also reports its router numbers: the step's totals (`moe`) and one row per MoE layer
(`MoELayers`), resolved in the same transfer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

NO_RANK = -1  # a deferred `nonfinite_rank` that resolves to None
LAYER_VALUES = ("aux", "z", "dropped")  # the first columns of a `MoELayers` row; the expert counts follow


@dataclass(frozen=True)
class MoELayers:
    """Per MoE layer of one step (`names`: each layer's block, `bigtrain.models.moe.moe_layer_names`), a row of
    `table` [L, 3 + 2E] (float64; on the device until resolved):

        aux, z, dropped    the layer's load-balancing loss, z-loss and dropped-assignment fraction, each the mean
                           over the global batch's micro-batches (every data rank's)
        assigned[E]        top-k assignments per expert before the capacity limit, summed over the global batch
        kept[E]            those the capacity limit kept (= assigned when dropless)
    """

    names: tuple[str, ...]
    table: torch.Tensor | list[list[float]]

    def record(self) -> dict[str, dict[str, Any]]:
        """The metrics.jsonl form: per layer `assigned` and `kept` (integers per expert), `dropped`, `aux`, `z` and
        `load_max_over_mean` = max_e assigned_e / mean_e assigned_e (1 when balanced, E when one expert takes all)."""
        rows = self.table.tolist() if isinstance(self.table, torch.Tensor) else self.table
        out = {}
        for name, row in zip(self.names, rows, strict=True):
            experts = (len(row) - len(LAYER_VALUES)) // 2
            head, assigned, kept = row[:len(LAYER_VALUES)], row[len(LAYER_VALUES):-experts], row[-experts:]
            mean = sum(assigned) / experts
            out[name] = {"assigned": [round(a) for a in assigned], "kept": [round(k) for k in kept],
                         **{k: v if math.isfinite(v) else None for k, v in zip(LAYER_VALUES, head, strict=True)},
                         "load_max_over_mean": max(assigned) / mean if mean else 0.0}
        return out


@dataclass
class StepResult:
    loss: float | torch.Tensor
    grad_norm: float | torch.Tensor
    skipped: bool | torch.Tensor  # update not applied (non-finite loss or gradient, or an fp16 overflow)
    finite: bool | torch.Tensor  # loss and gradient norm are finite (fp16 overflows are the scaler's business)
    layer_grad_norms: dict[str, float] | None = None
    tokens: int = 0  # real input tokens of the whole global batch (all ranks)
    # The lowest rank whose own loss was not finite (None when none was); deferred: a tensor, NO_RANK for None.
    nonfinite_rank: int | torch.Tensor | None = None
    # Mixture-of-experts router numbers (`moe_aux_loss`, `moe_z_loss`, `moe_dropped_fraction`); None without MoE.
    moe: dict[str, float | torch.Tensor] | None = None
    moe_layers: MoELayers | None = None  # the same per MoE layer, with the expert load

    def moe_record(self) -> dict[str, Any]:
        """The router numbers of a training line: the totals and, under `moe_layers`, each layer's (`MoELayers`)."""
        layers = {} if self.moe_layers is None else {"moe_layers": self.moe_layers.record()}
        return {**(self.moe or {}), **layers}

    def resolved(self) -> StepResult:
        """This result with Python values (waits for the device)."""
        return resolve_all([self])[0]

    @property
    def deferred(self) -> bool:
        return any(isinstance(v, torch.Tensor) for v in _values(self))


def _values(r: StepResult) -> tuple[float | int | bool | torch.Tensor, ...]:
    """Every value a step may leave on the device: five scalars, the MoE totals, the MoE layer table."""
    rank = NO_RANK if r.nonfinite_rank is None else r.nonfinite_rank
    table = () if r.moe_layers is None or not isinstance(r.moe_layers.table, torch.Tensor) else (r.moe_layers.table,)
    return r.loss, r.grad_norm, r.skipped, r.finite, rank, *(r.moe or {}).values(), *table


def resolve_all(results: list[StepResult]) -> list[StepResult]:
    """The results with Python values: every device value of every pending step in one host transfer (float64,
    so float32 and float64 values, ranks and expert counts below 2^53 come back exactly)."""
    pending = [r for r in results if r.deferred]
    if not pending:
        return results
    device = _device(pending)
    row = torch.cat([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(-1)
                     for r in pending for v in _values(r)])
    values = iter(row.cpu().tolist())
    out = []
    for r in results:
        if r.deferred:
            loss, grad_norm, skipped, finite, rank = (next(values) for _ in range(5))
            moe = None if r.moe is None else {k: next(values) for k in r.moe}
            layers = r.moe_layers
            if layers is not None and isinstance(layers.table, torch.Tensor):
                length, width = layers.table.shape
                layers = MoELayers(layers.names, [[next(values) for _ in range(width)] for _ in range(length)])
            r = dataclasses.replace(r, loss=loss, grad_norm=grad_norm, skipped=bool(skipped), finite=bool(finite),
                                    nonfinite_rank=None if rank == NO_RANK else int(rank), moe=moe,
                                    moe_layers=layers)
        out.append(r)
    return out


def _device(results: list[StepResult]) -> torch.device:
    for r in results:
        for v in _values(r):
            if isinstance(v, torch.Tensor):
                return v.device
    return torch.device("cpu")
