"""Held-out evaluation through a model: mean token loss (nats), perplexity, token and sequence accuracy.

    eval_loss = Σ token losses / Σ target tokens over all held-out batches (not a mean of batch means)

An engine sums over batches (`EvalSums`, the same totals under every layout and batch split up to the order of
the summation); `held_out_record` adds the sources' sums into the record of the whole held-out set and, for a
mixture, keeps each source's own record under `eval_sources`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bigtrain.models import TransformerLM
from bigtrain.models.loss import Criterion, correct_predictions, eval_metrics, model_inputs

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EvalSums:
    """Summed token loss and counts over some held-out batches: what adds up across batches and sources."""

    loss_sum: float = 0.0
    correct: int = 0
    targets: int = 0
    seq_ok: int = 0
    seqs: int = 0

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(self.loss_sum + other.loss_sum, self.correct + other.correct, self.targets + other.targets,
                        self.seq_ok + other.seq_ok, self.seqs + other.seqs)

    def record(self) -> dict[str, float]:
        """eval_loss, eval_ppl, eval_accuracy, eval_sequence_accuracy, eval_tokens."""
        return eval_metrics(self.loss_sum, self.correct, self.targets, self.seq_ok, self.seqs)


@torch.no_grad()
def evaluate_sums(model: TransformerLM, batches: list[Batch], autocast: Callable[[], object],
                  criterion: Criterion | None = None) -> EvalSums:
    """The summed loss and counts of `model` over `batches`; the model's training mode is restored after."""
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
    return EvalSums(loss_sum, correct, targets, seq_ok, seqs)


def evaluate(model: TransformerLM, batches: list[Batch], autocast: Callable[[], object],
             criterion: Criterion | None = None) -> dict[str, float]:
    """The evaluation record of `model` over `batches` (see the module docstring)."""
    return evaluate_sums(model, batches, autocast, criterion).record()


def held_out_record(sums_of: Callable[[list[Batch]], EvalSums], parts: Sequence[Any]) -> dict[str, Any]:
    """The record of the held-out set given by `parts` (each with `name` and `batches`: one per source), each part
    summed by `sums_of` (an engine's `evaluate_sums`); with named parts (a mixture) also `eval_sources`, each
    source's own record."""
    sums = [(part.name, sums_of(part.batches)) for part in parts]
    record: dict[str, Any] = sum((s for _, s in sums), EvalSums()).record()
    if any(name is not None for name, _ in sums):
        record["eval_sources"] = {name: s.record() for name, s in sums}
    return record
