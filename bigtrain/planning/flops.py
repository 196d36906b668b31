"""Model FLOPs per token and utilization (MFU).

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B):  6·N + 12·L·H·Q·T
  N: parameters that take part in matrix multiplies — every parameter except the input token and
     position tables, with the output head counted once (even when tied to the embedding); in a
     mixture-of-experts block only the top_k of E routed experts a token visits count (the active parameters:
     E - top_k experts' worth is left out);
  L: blocks (encoder + decoder), H·Q = d_model (heads × head size), T = sequence length.
6·N counts forward (2N) + backward (4N) of the dense layers; 12·L·H·Q·T the attention scores and mixing.
MFU = achieved FLOP/s / peak FLOP/s of the device (log.peak_tflops, or the table below for known GPUs).
"""

from __future__ import annotations

import torch

from bigtrain.models import TransformerLM
from bigtrain.models.moe import moe_layers
from bigtrain.planning.hardware import PEAK_TFLOPS_BY_DEVICE_NAME

GPU_PEAK_TFLOPS = PEAK_TFLOPS_BY_DEVICE_NAME  # dense bf16 peaks by device-name substring (planning/hardware.py)


def matmul_parameters(model: TransformerLM) -> int:
    params = {id(p): p for p in model.parameters()}
    for table in (model.embed.tokens.weight, getattr(model.embed.positions, "weight", None)):
        if table is not None:
            params.pop(id(table), None)
    inactive = sum(sum(p.numel() for p in layer.experts.parameters()) * (len(layer.experts) - layer.top_k)
                   // len(layer.experts) for layer in moe_layers(model))
    return (sum(p.numel() for p in params.values()) + model.head.weight.numel() * model.cfg.tie_embeddings
            - inactive)


def training_flops(matmul_params: float, n_blocks: int, d_model: int, seq_len: int) -> float:
    """6·N + 12·L·d_model·T: the training FLOPs per token of N matmul parameters and L blocks (the one formula;
    the planner applies it to a pipeline stage's share too)."""
    return 6.0 * matmul_params + 12.0 * n_blocks * d_model * seq_len


def flops_per_token(model: TransformerLM, seq_len: int) -> float:
    n_blocks = sum(len(stack) for stack in model.stacks())
    return training_flops(matmul_parameters(model), n_blocks, model.cfg.d_model, seq_len)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (CPUs: report achieved FLOP/s only)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
