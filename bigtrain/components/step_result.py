"""What one optimizer step reports, whatever engine ran it.

An engine may leave `loss`, `grad_norm`, `finite` and `skipped` on the device (0-dim tensors): reading them
synchronizes the host with the device, so the trainer reads them only when a log line, a checkpoint or an
evaluation needs them (`resolve_all`: one transfer for any number of pending steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    loss: float | torch.Tensor
    grad_norm: float | torch.Tensor
    skipped: bool | torch.Tensor  # update not applied (non-finite loss or gradient, or an fp16 overflow)
    finite: bool | torch.Tensor  # loss and gradient norm are finite (fp16 overflows are the scaler's business)
    layer_grad_norms: dict[str, float] | None = None
    tokens: int = 0  # real input tokens of the whole global batch (all ranks)
    nonfinite_rank: int | None = None  # the lowest rank whose own loss was not finite (when one was)

    def resolved(self) -> StepResult:
        """This result with Python values (waits for the device)."""
        return resolve_all([self])[0]

    @property
    def deferred(self) -> bool:
        return any(isinstance(v, torch.Tensor) for v in (self.loss, self.grad_norm, self.skipped, self.finite))


def resolve_all(results: list[StepResult]) -> list[StepResult]:
    """The results with Python values: every device value of every pending step in one host transfer."""
    pending = [r for r in results if r.deferred]
    if not pending:
        return results
    rows = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32, device=_device(pending)).reshape(())
                                     for v in (r.loss, r.grad_norm, r.skipped, r.finite)]) for r in pending])
    values = iter(rows.cpu().tolist())
    out = []
    for r in results:
        if r.deferred:
            loss, grad_norm, skipped, finite = next(values)
            r = dataclasses.replace(r, loss=loss, grad_norm=grad_norm, skipped=bool(skipped), finite=bool(finite))
        out.append(r)
    return out


def _device(results: list[StepResult]) -> torch.device:
    for r in results:
        for v in (r.loss, r.grad_norm, r.skipped, r.finite):
            if isinstance(v, torch.Tensor):
                return v.device
    return torch.device("cpu")
