"""Activation checkpointing applied to an unchanged model.

full: each block keeps only its input and recomputes everything inside during backward.
selective (Korthikanti et al. 2022): only the attention core softmax(QKᵀ/√d)V is recomputed — the part
whose activations grow with sequence² while costing few FLOPs to redo.
Uses torch.utils.checkpoint (non-reentrant), which restores the RNG so dropout masks are identical.
The forward is replaced per instance, so parameter names and checkpoints are unchanged.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.models.attention import Attention
from bigtrain.models.transformer import TransformerLM


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    run.recomputed = True
    return run


def apply_activation_checkpointing(model: TransformerLM, mode: str, every_n_layers: int = 1) -> None:
    """Recompute in backward: whole blocks (`full`, every n-th block) or attention cores (`selective`)."""
    if mode == "none":
        return
    for stack in model.stacks():
        for index, block in enumerate(stack):
            if mode == "full" and index % every_n_layers == 0:
                block.forward = _checkpointed(block.forward)
            elif mode == "selective":
                for module in block.modules():
                    if isinstance(module, Attention):
                        module.core = _checkpointed(module.core)


def is_checkpointed(module: nn.Module) -> bool:
    return getattr(module.forward, "recomputed", False)
