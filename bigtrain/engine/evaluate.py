"""Held-out evaluation through a model: mean token loss (nats), perplexity, token and sequence accuracy.

    eval_loss = Σ token losses / Σ target tokens over all held-out batches (not a mean of batch means)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bigtrain.models import TransformerLM
from bigtrain.models.loss import Criterion, correct_predictions, eval_metrics, model_inputs


@torch.no_grad()
def evaluate(model: TransformerLM, batches: list[dict[str, torch.Tensor]],
             autocast: Callable[[], object], criterion: Criterion | None = None) -> dict[str, float]:
    """The evaluation record of `model` over `batches` (see the module docstring); the model's training mode
    is restored after."""
    criterion = criterion or Criterion()
    was_training = model.training
    model.eval()
    loss_sum, correct, targets, seq_ok, seqs = 0.0, 0, 0, 0, 0
    for batch in batches:
        with autocast():
            logits = model(**model_inputs(batch))
        loss_sum += float(criterion.loss_sum(logits, batch["labels"]))
        c, t, s, n = correct_predictions(criterion.predictions(logits), batch["labels"])
        correct, targets, seq_ok, seqs = correct + c, targets + t, seq_ok + s, seqs + n
    model.train(was_training)
    return eval_metrics(loss_sum, correct, targets, seq_ok, seqs)
