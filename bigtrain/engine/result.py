"""What one optimizer step reports, whatever engine ran it.

An engine may leave `loss`, `grad_norm`, `finite`, `skipped` and `nonfinite_rank` on the device (0-dim
tensors): reading them synchronizes the host with the device, so the trainer reads them only when a log line, a
checkpoint or an evaluation needs them (`resolve_all`: one transfer for any number of pending steps). A deferred
`nonfinite_rank` holds the rank, or -1 for none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

NO_RANK = -1  # a deferred `nonfinite_rank` that resolves to None


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

    def resolved(self) -> StepResult:
        """This result with Python values (waits for the device)."""
        return resolve_all([self])[0]

    @property
    def deferred(self) -> bool:
        return any(isinstance(v, torch.Tensor) for v in _values(self))


def _values(r: StepResult) -> tuple[float | int | bool | torch.Tensor, ...]:
    rank = NO_RANK if r.nonfinite_rank is None else r.nonfinite_rank
    return r.loss, r.grad_norm, r.skipped, r.finite, rank, *(r.moe or {}).values()


def resolve_all(results: list[StepResult]) -> list[StepResult]:
    """The results with Python values: every device value of every pending step in one host transfer (float64,
    so float32 and float64 values and ranks come back exactly)."""
    pending = [r for r in results if r.deferred]
    if not pending:
        return results
    device = _device(pending)
    row = torch.cat([torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                                  for v in _values(r)]) for r in pending])
    values = iter(row.cpu().tolist())
    out = []
    for r in results:
        if r.deferred:
            loss, grad_norm, skipped, finite, rank = (next(values) for _ in range(5))
            moe = None if r.moe is None else {k: next(values) for k in r.moe}
            r = dataclasses.replace(r, loss=loss, grad_norm=grad_norm, skipped=bool(skipped), finite=bool(finite),
                                    nonfinite_rank=None if rank == NO_RANK else int(rank), moe=moe)
        out.append(r)
    return out


def _device(results: list[StepResult]) -> torch.device:
    for r in results:
        for v in _values(r):
            if isinstance(v, torch.Tensor):
                return v.device
    return torch.device("cpu")
