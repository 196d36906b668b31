"""Held-out evaluation: mean token loss (nats), perplexity, token and sequence accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from bigtrain.config import Config
from bigtrain.data import Tokenizer, collate, eval_batch_indices
from bigtrain.models import TransformerLM
from bigtrain.models.loss import Criterion, correct_predictions, eval_metrics, model_inputs


@torch.no_grad()
def evaluate(model: TransformerLM, batches: list[dict[str, torch.Tensor]],
             autocast: Callable[[], object], criterion: Criterion | None = None) -> dict[str, float]:
    """eval_loss = Σ token losses / Σ target tokens over all held-out batches (not a mean of batch means)."""
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


def heldout_batches(cfg: Config, tokenizer: Tokenizer, heldout: Dataset, device: torch.device,
                    pad_multiple: int = 1) -> list[dict[str, torch.Tensor]]:
    """The first train.eval_batches held-out batches of train.micro_batch_size samples, in order."""
    groups = eval_batch_indices(len(heldout), cfg.train.micro_batch_size, cfg.train.eval_batches)
    return [{k: v.to(device) for k, v in collate([heldout[i] for i in g], cfg.model.family, tokenizer.pad_id,
                                                 pad_multiple).items()} for g in groups]


def evaluate_weights(path: Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Held-out metrics, on one device, of the weights at `path`: a run.dir, a checkpoint (its layout-free form
    read directly), or a folder written by `bigtrain export` or `bigtrain consolidate` (see
    `bigtrain.checkpoint.weights`)."""
    from bigtrain.data import build_datasets
    from bigtrain.distributed.device import autocast
    from bigtrain.inference.load import load_model

    loaded = load_model(path, overrides)
    cfg, tokenizer, device = loaded.cfg, loaded.tokenizer, loaded.device
    _, heldout = build_datasets(cfg, tokenizer)
    return evaluate(loaded.model, heldout_batches(cfg, tokenizer, heldout, device),
                    lambda: autocast(cfg.train.precision, device))
