"""`build_model`: construct on the meta device, allocate on the target device, initialize from the seed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bigtrain.config import ModelConfig
from bigtrain.models.init import Shard, init_weights
from bigtrain.models.transformer import MODEL_CLASSES, TransformerLM


def resolve_vocab_size(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """model.vocab_size if set (must hold the tokenizer), else the tokenizer's size rounded up."""
    if cfg.vocab_size is not None:
        if cfg.vocab_size < tokenizer_vocab:
            from bigtrain.errors import ConfigError

            raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary of {tokenizer_vocab} ids. Set model.vocab_size >= {tokenizer_vocab} "
                              f"or null to size it from the tokenizer.")
        return cfg.vocab_size
    m = cfg.vocab_multiple
    return (tokenizer_vocab + m - 1) // m * m


def build_model(cfg: ModelConfig, vocab_size: int, device: str | torch.device = "cpu", seed: int = 0,
                transform: Callable[[TransformerLM], dict[str, Shard]] | None = None) -> TransformerLM:
    """The model for `cfg.family`; on device 'meta' only shapes exist (no memory, no init).

    `transform` rewrites the model while it is still on the meta device (tensor parallelism replaces
    layers by their shards) and returns which parameters it sharded, so that initialization draws the
    full tensors and keeps this rank's slices.
    """
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.family](cfg, vocab_size)
    shards = transform(model) if transform is not None else None
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model, seed, shards)
    return model


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters; with exclude_embeddings, the token and learned position tables are left out."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        embed = getattr(model, "embed", None)
        if embed is not None:
            for p in embed.parameters():
                params.pop(id(p), None)
    return sum(p.numel() for p in params.values())
