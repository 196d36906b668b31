"""Looking inside a model: attention weights of every attention layer for one forward pass, which piece of
the model (embedding, block, head) a parameter belongs to, and the gradient norm of each piece."""

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


def model_piece(parameter_name: str) -> str:
    """The piece of the model a parameter belongs to: 'embed', 'blocks.3', 'decoder_blocks.0', 'head', ..."""
    parts = parameter_name.split(".")
    return ".".join(parts[:2]) if parts[0].endswith("blocks") else parts[0]


def per_layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """‖g‖ per piece of the model (embed, each block, head), for TensorBoard (one device; the sharded version
    is `bigtrain.parallel.grad_norm.piece_grad_norms`)."""
    sums: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            key = model_piece(name)
            sums[key] = sums.get(key, 0.0) + p.grad.float().pow(2).sum()
    return {k: float(v) ** 0.5 for k, v in sums.items()}
