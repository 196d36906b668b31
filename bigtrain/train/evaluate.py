"""Held-out evaluation: mean token loss (nats), perplexity, token and sequence accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from bigtrain.components import checkpoint as ckpt
from bigtrain.components.loss import Criterion, correct_predictions, eval_metrics, model_inputs
from bigtrain.config import Config
from bigtrain.data import Tokenizer, collate, eval_batch_indices
from bigtrain.errors import CheckpointError
from bigtrain.models import TransformerLM


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


def evaluate_weights(weights_dir: Path, overrides: list[str] | None = None) -> dict[str, float]:
    """Held-out metrics of consolidated weights (`model.pt` + `config.yaml`) on one device."""
    from bigtrain.components.precision import autocast, resolve_device
    from bigtrain.config import load_config
    from bigtrain.data import build_datasets, build_tokenizer
    from bigtrain.models import build_model, resolve_vocab_size

    for name in ("model.pt", "config.yaml"):
        if not (weights_dir / name).exists():
            raise CheckpointError(f"{weights_dir} has no {name}; pass a directory written by `bigtrain "
                                  f"consolidate`.")
    cfg = load_config(weights_dir / "config.yaml", overrides)
    device = resolve_device(cfg.train)
    tokenizer = build_tokenizer(cfg.data)
    _, heldout = build_datasets(cfg, tokenizer)
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, tokenizer.vocab_size), device)
    try:
        state = torch.load(weights_dir / "model.pt", map_location=device, weights_only=True)
    except Exception as exc:  # a damaged file, or objects the weights-only unpickler refuses
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"Cannot read {weights_dir / 'model.pt'} ({type(exc).__name__}: {reason}). Write it "
                              f"again with `bigtrain consolidate`.") from None
    ckpt.load_into(model, state, weights_dir / "model.pt")
    return evaluate(model, heldout_batches(cfg, tokenizer, heldout, device),
                    lambda: autocast(cfg.train.precision, device))
