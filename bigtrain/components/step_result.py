"""What one optimizer step reports, whatever engine ran it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool  # update not applied (non-finite loss or gradient, or an fp16 overflow)
    finite: bool  # loss and gradient norm are finite (fp16 overflows are normal and handled by the scaler)
    layer_grad_norms: dict[str, float] | None = None
    tokens: int = 0  # real input tokens of the whole global batch (all ranks)
    nonfinite_rank: int | None = None  # the lowest rank whose own loss was not finite (when one was)
