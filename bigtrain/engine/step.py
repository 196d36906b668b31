"""One optimizer step over a global batch split into micro-batches (gradient accumulation).

The loss of the step is the mean over every target token of the global batch:
    L = Σ_micro Σ_tokens ce / N_targets(global batch)
Each micro-batch backpropagates its share Σ ce / N_targets, so the accumulated gradient is exactly the
gradient of L whatever the micro-batch size, and padded batches weigh every token equally.

Nothing here waits for the device: the loss, the gradient norm and the finiteness check stay on it, and a
non-finite step is skipped on the device too (the optimizer gets `found_inf`, as with a loss scaler: fused
AdamW and bigtrain's LAMB then leave weights and state untouched). The trainer reads the values at log steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bigtrain.engine.result import StepResult
from bigtrain.models import TransformerLM
from bigtrain.models.inspect import per_layer_grad_norms
from bigtrain.models.loss import Criterion, count_input_tokens, count_targets, model_inputs


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` tensor: fused torch optimizers and bigtrain's LAMB."""
    return bool(getattr(optimizer, "supports_found_inf", False) or
                any(g.get("fused") for g in optimizer.param_groups))


def train_step(model: TransformerLM, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, torch.Tensor]],
               autocast: Callable[[], object], grad_clip: float,
               scaler: torch.amp.GradScaler | None = None, layer_norms: bool = False,
               criterion: Criterion | None = None, counts: tuple[int, int] | None = None) -> StepResult:
    """Forward/backward every micro-batch, clip the global gradient norm, and apply one update.

    counts: (target tokens, input tokens) of the batch, counted on the host before it moved to the device
    (else counted here, which waits for the device)."""
    criterion = criterion or Criterion()
    n_targets, n_tokens = counts if counts is not None else (
        sum(count_targets(b) for b in micro_batches), sum(count_input_tokens(b) for b in micro_batches))
    total = torch.zeros((), dtype=torch.float32, device=micro_batches[0]["labels"].device)
    for batch in micro_batches:
        with autocast():
            logits = model(**model_inputs(batch))
        loss = criterion.loss_sum(logits, batch["labels"]) / n_targets
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    layer_grad_norms = per_layer_grad_norms(model) if layer_norms else None
    if scaler is not None:  # fp16: the scaler decides (and synchronizes, as its step must)
        finite = bool(torch.isfinite(total)) and bool(torch.isfinite(grad_norm))
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself when gradients overflowed
        scaler.update()
        skipped: bool | torch.Tensor = scaler.get_scale() < scale
        finite_value: bool | torch.Tensor = finite
    else:
        finite_value = torch.isfinite(total) & torch.isfinite(grad_norm)
        skipped = ~finite_value  # never apply a NaN/inf update; the caller stops or goes on
        if skips_on_device(optimizer):
            optimizer.found_inf = skipped.float()
            try:
                optimizer.step()
            finally:
                optimizer.found_inf = None
        elif bool(finite_value):  # an optimizer that cannot skip by itself: decide on the host
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=total, grad_norm=grad_norm.float(), skipped=skipped, finite=finite_value,
                      layer_grad_norms=layer_grad_norms, tokens=n_tokens,
                      nonfinite_rank=None)
