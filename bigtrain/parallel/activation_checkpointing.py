"""Activation checkpointing applied to an unchanged model, as a wrapper module.

full: each block keeps only its input and recomputes everything inside during backward.
selective (Korthikanti et al. 2022): only the attention core softmax(QKᵀ/√d)V is recomputed — the part
whose activations grow with sequence² while costing few FLOPs to redo.
Uses torch.utils.checkpoint (non-reentrant), which restores the RNG so dropout masks are identical.

`ActivationCheckpoint` takes the place of the module it wraps (a block, or an attention core), so
`print(model)` shows which pieces recompute. Parameter names stay those of the unwrapped model: the wrapper
registers the wrapped module's children as its own (the wrapped module is kept as a plain attribute, not
as a child), so `blocks.3.self_attn.qkv_proj.weight` is the same name with or without checkpointing and
checkpoints, initialization seeds and tensor-parallel plans are unaffected.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.models.attention import Attention
from bigtrain.models.transformer import TransformerLM


class ActivationCheckpoint(nn.Module):
    """Runs `module` under torch.utils.checkpoint: its activations are recomputed in backward."""

    def __init__(self, module: nn.Module) -> None:
        if next(module.parameters(recurse=False), None) is not None or \
                next(module.buffers(recurse=False), None) is not None:
            raise ValueError(f"ActivationCheckpoint wraps modules whose tensors live in their children; "
                             f"{type(module).__name__} holds parameters or buffers itself")
        super().__init__()
        object.__setattr__(self, "wrapped", module)  # not a child: its children are ours, under the same names
        for name, child in module.named_children():
            self.add_module(name, child)

    def forward(self, *args, **kwargs):
        return checkpoint(self.wrapped, *args, use_reentrant=False, **kwargs)

    def train(self, mode: bool = True) -> ActivationCheckpoint:
        super().train(mode)
        self.wrapped.training = mode  # its children are ours and already switched
        return self

    def extra_repr(self) -> str:
        return f"recomputes {type(self.wrapped).__name__} in backward"


def apply_activation_checkpointing(model: TransformerLM, mode: str, every_n_layers: int = 1) -> None:
    """Recompute in backward: whole blocks (`full`, every n-th block) or attention cores (`selective`)."""
    if mode == "none":
        return
    for stack in model.stacks():
        for index, block in enumerate(stack):
            if mode == "full" and index % every_n_layers == 0:
                stack[index] = ActivationCheckpoint(block)
            elif mode == "selective":
                for module in block.modules():
                    if isinstance(module, Attention):
                        module.core = ActivationCheckpoint(module.core)


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, ActivationCheckpoint)
