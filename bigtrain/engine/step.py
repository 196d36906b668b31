"""One optimizer step over a global batch split into micro-batches (gradient accumulation).

The loss of the step is the mean over every target token of the global batch:
    L = Σ_micro Σ_tokens ce / N_targets(global batch)
Each micro-batch backpropagates its share Σ ce / N_targets, so the accumulated gradient is exactly the
gradient of L whatever the micro-batch size, and padded batches weigh every token equally.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bigtrain.components.loss import Criterion, count_input_tokens, count_targets, model_inputs
from bigtrain.components.step_result import StepResult
from bigtrain.models import TransformerLM
from bigtrain.models.inspect import per_layer_grad_norms


def train_step(model: TransformerLM, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]],
               autocast: Callable[[], object], grad_clip: float,
               scaler: torch.amp.GradScaler | None = None, layer_norms: bool = False,
               criterion: Criterion | None = None) -> StepResult:
    """Forward/backward every micro-batch, clip the global gradient norm, and apply one update."""
    criterion = criterion or Criterion()
    n_targets = sum(count_targets(b) for b in micro_batches)
    total = torch.zeros((), dtype=torch.float32, device=micro_batches[0]["labels"].device)
    for batch in micro_batches:
        with autocast():
            logits = model(**model_inputs(batch))
        loss = criterion.loss_sum(logits, batch["labels"]) / n_targets
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()  # stays on the device: one sync per step, below
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    finite = math.isfinite(float(total)) and math.isfinite(grad_norm)
    layer_grad_norms = per_layer_grad_norms(model) if layer_norms else None
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself when gradients overflowed
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        skipped = not finite  # never apply a NaN/inf update; the caller stops or goes on
        if finite:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=float(total), grad_norm=grad_norm, skipped=skipped, finite=finite,
                      layer_grad_norms=layer_grad_norms, tokens=sum(count_input_tokens(b) for b in micro_batches),
                      nonfinite_rank=None if finite else 0)
