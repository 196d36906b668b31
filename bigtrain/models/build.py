"""`build_model`: construct on the meta device, then (unless the device is meta) allocate on the target device
and initialize from the seed with `materialize`, the one initialization path of every layout."""

from __future__ import annotations

import torch
from torch import nn

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


def build_model(cfg: ModelConfig, vocab_size: int, device: str | torch.device = "cpu", seed: int = 0
                ) -> TransformerLM:
    """The model for `cfg.family`; on device 'meta' only shapes exist (no memory, no init).

    Parallel layouts build on 'meta', let `bigtrain.parallel.parallelize` rewrite the model, and materialize
    afterwards: every layout initializes through `materialize`.
    """
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.family](cfg, vocab_size)
    if torch.device(device).type != "meta":
        materialize(model, device, seed)
    return model


def materialize(model: TransformerLM, device: str | torch.device, seed: int, shards: dict[str, Shard] | None = None,
                piece: nn.Module | None = None) -> None:
    """Allocate `model` (or only its submodule `piece`) on `device` and initialize it from `seed`.

    Parameters listed in `shards` hold one slice of the full tensor (tensor parallelism): the full tensor is
    drawn from the parameter's own generator and the slice kept, so any layout holds exactly the pieces of the
    single-device model built from the same seed.
    """
    (piece or model).to_empty(device=device)
    if piece is None:
        model.tie_weights()
    init_weights(model, seed, shards, only=piece)


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Unique parameters; with exclude_embeddings, the token and learned position tables are left out."""
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        embed = getattr(model, "embed", None)
        if embed is not None:
            for p in embed.parameters():
                params.pop(id(p), None)
    return sum(p.numel() for p in params.values())
