"""Held-out evaluation: mean token loss (nats), perplexity, token and sequence accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bigtrain.models import TransformerLM
from bigtrain.train.loss import correct_predictions, cross_entropy_sum, model_inputs


@torch.no_grad()
def evaluate(model: TransformerLM, batches: list[dict[str, torch.Tensor]],
             autocast: Callable[[], object]) -> dict[str, float]:
    """eval_loss = Σ token losses / Σ target tokens over all held-out batches (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, targets, seq_ok, seqs = 0.0, 0, 0, 0, 0
    for batch in batches:
        with autocast():
            logits = model(**model_inputs(batch))
        loss_sum += float(cross_entropy_sum(logits, batch["labels"]))
        c, t, s, n = correct_predictions(logits, batch["labels"])
        correct, targets, seq_ok, seqs = correct + c, targets + t, seq_ok + s, seqs + n
    model.train(was_training)
    loss = loss_sum / max(targets, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_accuracy": correct / max(targets, 1),
            "eval_sequence_accuracy": seq_ok / max(seqs, 1), "eval_tokens": targets}
