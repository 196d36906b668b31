"""Regional compilation: `torch.compile` of each transformer block (`train.compile`).

All blocks of a stack run the same code, and dynamo treats module parameters as graph inputs, so one compiled
graph serves every block: compile time does not grow with depth. `CompiledBlock` takes the place of the block
it compiles, as `ActivationCheckpoint` does: it registers the block's children as its own (the block is kept as
a plain attribute), so parameter names, checkpoints and tensor-parallel plans are unchanged.

Compiled is the training and evaluation forward (and its backward, through AOTAutograd). Incremental decoding
(a `cache` argument: generation) runs the block eagerly: its cache is a mutable Python object whose lengths
change at every step, which would recompile or graph-break each time for a few-token forward.

Random draws (dropout) use eager's generator and kernels (inductor's `fallback_random`), so a compiled block
draws the masks an eager one draws: dropout curves match eager, and the tensor-parallel rule (same mask on
every tensor rank in replicated regions, one per rank in sharded ones) holds unchanged.

Order in `parallelize`: after tensor parallelism (the collectives of the shards are traced into the graph)
and after activation checkpointing (a checkpointed block is compiled whole: dynamo traces
`torch.utils.checkpoint` and the partitioner still recomputes in backward), before the pipeline split (a
pipeline layer holds the compiled block). DeepSpeed's pipeline engine runs backward with `retain_graph` when a
stage sends several float tensors, which AOTAutograd's donated buffers forbid: under a pipeline they are turned
off for the process (the check runs at backward time, so it cannot be scoped to the compiled calls).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from torch import nn

from bigtrain.errors import ConfigError
from bigtrain.models.transformer import TransformerLM

INDUCTOR_OPTIONS = {"fallback_random": True}


class CompiledBlock(nn.Module):
    """Runs `block` through `torch.compile` (eagerly when called with a decoding `cache`)."""

    def __init__(self, block: nn.Module) -> None:
        if next(block.parameters(recurse=False), None) is not None or \
                next(block.buffers(recurse=False), None) is not None:
            raise ValueError(f"CompiledBlock wraps modules whose tensors live in their children; "
                             f"{type(block).__name__} holds parameters or buffers itself")
        super().__init__()
        object.__setattr__(self, "wrapped", block)  # not a child: its children are ours, under the same names
        for name, child in block.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_compiled", None)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("cache") is not None:
            return self.wrapped(*args, **kwargs)
        if self._compiled is None:  # made on first use: a copy of the model gets its own
            object.__setattr__(self, "_compiled", torch.compile(self.wrapped, options=INDUCTOR_OPTIONS))
        return self._compiled(*args, **kwargs)

    def train(self, mode: bool = True) -> CompiledBlock:
        super().train(mode)
        self.wrapped.train(mode)  # its children are ours; this sets the block's (and any wrapper's) own flag
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledBlock:
        from copy import deepcopy

        copy = CompiledBlock(deepcopy(self.wrapped, memo))
        copy.train(self.training)
        memo[id(self)] = copy
        return copy

    def extra_repr(self) -> str:
        return f"torch.compile of {type(self.wrapped).__name__}"


def apply_compile(model: TransformerLM, device: torch.device | str, retain_graph: bool = False) -> None:
    """Replace every block of every stack by its `CompiledBlock` (nothing is compiled before the first call).
    retain_graph: backward will run with retain_graph=True (the pipeline engine), which donated buffers forbid."""
    if torch.device(device).type == "cpu":
        check_cpp_compiler()
    if retain_graph:
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    for stack in model.stacks():
        for index, block in enumerate(stack):
            stack[index] = CompiledBlock(block)


def check_cpp_compiler() -> None:
    """Inductor builds CPU kernels with a C++ compiler (`$CXX`, else g++): refuse now rather than at step 1."""
    from torch._inductor import config as inductor_config

    if os.environ.get("TORCH_INDUCTOR_INSTALL_GXX"):
        return  # inductor fetches g++ itself
    names = [c for c in inductor_config.cpp.cxx if c] if isinstance(inductor_config.cpp.cxx, tuple | list) \
        else [inductor_config.cpp.cxx]
    if not any(shutil.which(name) for name in names):
        given = os.environ.get("CXX")
        raise ConfigError(f"train.compile=true on the CPU needs a C++ compiler (inductor builds C++ kernels), and "
                          f"{' or '.join(names)} was not found{' (from $CXX)' if given else ''}: install one "
                          f"(or point $CXX at it), or set train.compile=false.")


def is_compiled(module: nn.Module) -> bool:
    return isinstance(module, CompiledBlock)
