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

Under context parallelism the attention cores read the current micro-batch's tokens (`ContextInputs`) when they
run, and a recompute runs in backward, when a pipeline schedule may already have run a later micro-batch's
forward: the recompute then runs with the tokens its forward saw (`_tokens_of_forward`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.models.attention import Attention
from bigtrain.models.transformer import TransformerLM
from bigtrain.parallel.context.inputs import ContextInputs


def _tokens_of_forward(context: ContextInputs) -> Callable[[], tuple]:
    """torch.utils.checkpoint's `context_fn`: nothing around the forward; around the recompute, `context`'s tokens
    as the forward saw them (restored after)."""

    def context_fn() -> tuple:
        seen = context.tokens

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            current, context.tokens = context.tokens, seen
            try:
                yield
            finally:
                context.tokens = current

        return contextlib.nullcontext(), recompute()

    return context_fn


class ActivationCheckpoint(nn.Module):
    """Runs `module` under torch.utils.checkpoint: its activations are recomputed in backward (under context
    parallelism with the micro-batch's tokens of its forward)."""

    def __init__(self, module: nn.Module, context: ContextInputs | None = None) -> None:
        if next(module.parameters(recurse=False), None) is not None or \
                next(module.buffers(recurse=False), None) is not None:
            raise ValueError(f"ActivationCheckpoint wraps modules whose tensors live in their children; "
                             f"{type(module).__name__} holds parameters or buffers itself")
        super().__init__()
        object.__setattr__(self, "wrapped", module)  # not a child: its children are ours, under the same names
        object.__setattr__(self, "context", context)
        for name, child in module.named_children():
            self.add_module(name, child)

    def forward(self, *args, **kwargs):
        if self.context is None:
            return checkpoint(self.wrapped, *args, use_reentrant=False, **kwargs)
        return checkpoint(self.wrapped, *args, use_reentrant=False, context_fn=_tokens_of_forward(self.context),
                          **kwargs)

    def train(self, mode: bool = True) -> ActivationCheckpoint:
        super().train(mode)
        self.wrapped.training = mode  # its children are ours and already switched
        return self

    def extra_repr(self) -> str:
        return f"recomputes {type(self.wrapped).__name__} in backward"


def apply_activation_checkpointing(model: TransformerLM, mode: str, every_n_layers: int = 1,
                                   context: ContextInputs | None = None) -> None:
    """Recompute in backward: whole blocks (`full`, every n-th block) or attention cores (`selective`);
    `context`: the split the attention cores read under context parallelism."""
    if mode == "none":
        return
    for stack in model.stacks():
        for index, block in enumerate(stack):
            if mode == "full" and index % every_n_layers == 0:
                stack[index] = ActivationCheckpoint(block, context)
            elif mode == "selective":
                for module in block.modules():
                    if isinstance(module, Attention):
                        module.core = ActivationCheckpoint(module.core, context)


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, ActivationCheckpoint)
