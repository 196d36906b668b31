"""Looking inside a model: attention weights of every attention layer for one forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from bigtrain.models.attention import Attention


@contextlib.contextmanager
def attention_maps(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, attention layers compute softmax(QKᵀ/√d + mask) explicitly (instead of the fused
    kernel) and keep it; on exit the dict maps each layer's name to its weights [batch, heads, query, key].

        with attention_maps(model) as maps:
            model(ids)
        maps["blocks.0.self_attn"]
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    maps: dict[str, torch.Tensor] = {}
    for layer in layers.values():
        layer.record_weights = True
    try:
        yield maps
    finally:
        for name, layer in layers.items():
            layer.record_weights = False
            if layer.weights is not None:
                maps[name] = layer.weights.detach()
            layer.weights = None
