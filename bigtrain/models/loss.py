"""Token-level cross-entropy, summed so that micro-batches and ranks can be combined exactly; accuracy counts
and the evaluation record built from those sums."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything the model's forward takes: the batch without its labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens fed to the model: encoder and decoder inputs."""
    total = 0
    for ids, mask in (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask")):
        if ids in batch:
            total += int(batch[mask].sum()) if mask in batch else batch[ids].numel()
    return total


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_t -log softmax(logits_t)[label_t] over targets (labels == -100 are skipped), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def correct_predictions(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int, int]:
    """(correct tokens, target tokens, fully correct sequences, sequences) for accuracy reports;
    predictions: [B, T] token ids (the argmax of the logits)."""
    valid = labels != IGNORE_INDEX
    hit = (predictions == labels) & valid
    seq_ok = (hit | ~valid).all(-1) & valid.any(-1)
    return int(hit.sum()), int(valid.sum()), int(seq_ok.sum()), int(valid.any(-1).sum())


def eval_metrics(loss_sum: float, correct: float, targets: float, seq_ok: float, seqs: float
                 ) -> dict[str, float]:
    """The evaluation record from summed token loss and counts over all held-out batches."""
    loss = loss_sum / max(targets, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_accuracy": correct / max(targets, 1),
            "eval_sequence_accuracy": seq_ok / max(seqs, 1), "eval_tokens": int(targets)}


class Criterion:
    """What the trainer does with a model's logits: the summed loss, predictions, and full logits.

    This one reads logits over the whole vocabulary; tensor parallelism substitutes
    `bigtrain.parallel.cross_entropy.VocabParallelCriterion`, whose logits are vocabulary shards.
    """

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, labels)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
