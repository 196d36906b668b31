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
from bigtrain.models.loss import IGNORE_INDEX, Criterion, correct_predictions, eval_metrics, model_inputs
from bigtrain.parallel.context.inputs import ContextInputs

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
                  criterion: Criterion | None = None, context: ContextInputs | None = None) -> EvalSums:
    """The summed loss and counts of `model` over `batches`; the model's training mode is restored after.
    Under context parallelism (`context`) each rank runs its share of every sequence and the sums are taken over
    the context group (a sequence is correct when all its ranks' tokens are)."""
    if context is not None:
        return _context_sums(model, batches, autocast, criterion or Criterion(), context)
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


def _context_sums(model: TransformerLM, batches: list[Batch], autocast: Callable[[], object], criterion: Criterion,
                  context: ContextInputs) -> EvalSums:
    """`evaluate_sums` with each sequence split over the context group: per sequence, the hits and targets of
    every rank are summed before a sequence counts as correct (hits = targets > 0)."""
    was_training = model.training
    model.eval()
    total = EvalSums()
    try:
        for batch in batches:
            local = context.split(batch)
            with autocast():
                logits = model(**model_inputs(local))
            labels = local["labels"]
            valid = labels != IGNORE_INDEX
            hits = ((criterion.predictions(logits) == labels) & valid).sum(-1)
            sums = context.sum(torch.cat([criterion.loss_sum(logits, labels).double().reshape(1),
                                          hits.double(), valid.sum(-1).double()]))
            loss, hits, valid_per_row = sums[0], sums[1:1 + len(hits)], sums[1 + len(hits):]
            total = total + EvalSums(float(loss), int(hits.sum()), int(valid_per_row.sum()),
                                     int(((hits == valid_per_row) & (valid_per_row > 0)).sum()),
                                     int((valid_per_row > 0).sum()))
    finally:
        context.clear()
        model.train(was_training)
    return total


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
