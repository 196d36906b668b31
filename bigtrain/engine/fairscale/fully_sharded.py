"""fairscale's FullyShardedDataParallel (FSDP) around bigtrain's model: the ZeRO-3 equivalent of the fairscale
engine.

    units      every block is its own FSDP unit and the model is the root unit (embedding, head, final norm,
               position bias): a unit's parameters are all-gathered over the data group just before its forward
               (and again before its backward) and freed after, so a rank keeps 1/D of every parameter at rest
               and one block's full parameters at a time
    sharding   per parameter (`flatten_parameters=False`): each parameter stays its own tensor, sharded flat
               (torch.chunk, zero padding at the end), so the optimizer's decay / no_decay groups and the
               layout-free checkpoint see parameters by name
    gradients  reduce-scattered over the data group after each micro-batch's backward and averaged
               (÷ D); each rank accumulates only its shard
    precision  fp32: the parameters stay fp32 (`mixed_precision=False`). bf16: fairscale's mixed precision —
               fp32 master shards (what the optimizer updates), parameters gathered and computed in bf16 (half
               the all-gather bytes; the gathered copy is what autograd saves, so it is freed and gathered
               again like the parameters), gradients reduce-scattered in fp32, position tables kept fp32: the
               numerics of DeepSpeed's bf16 ZeRO-3 (bf16 weights over fp32 masters) rather than of autocast
               over fp32 weights, which would keep a bf16 copy of every weight alive until backward.
               Autocast's cache of casts is cleared after each unit either way

The process group for both the all-gathers and the reduce-scatters is the layout's data group, so FSDP
composes with tensor parallelism: it shards each rank's tensor-parallel shard over the data group.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.compat.fairscale import full_shape, named_unwrapped_parameters
from bigtrain.errors import CheckpointError
from bigtrain.models import TransformerLM


def wrap_fully_sharded(model: TransformerLM, group: dist.ProcessGroup, device: torch.device,
                       bf16: bool = False) -> nn.Module:
    """The model with each block in its own FSDP unit, inside a root unit; returns the root (which forwards
    attribute lookups to the model). The model's parameters are sharded in place."""
    from fairscale.nn import FullyShardedDataParallel

    precision = ({"mixed_precision": True, "compute_dtype": torch.bfloat16, "buffer_dtype": torch.float32,
                  "fp32_reduce_scatter": True} if bf16 else {"mixed_precision": False})

    def unit(module: nn.Module) -> nn.Module:
        return FullyShardedDataParallel(module, process_group=group, process_group_reduce_scatter=group,
                                        compute_device=device, flatten_parameters=False, reshard_after_forward=True,
                                        clear_autocast_cache=True, **precision)

    for stack in model.stacks():
        for index, block in enumerate(stack):
            stack[index] = unit(block)
    return unit(model)


def shard_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shard of every parameter, by its name in the unwrapped model."""
    return {name: p.detach() for name, p in named_unwrapped_parameters(root)}


def shard_shapes(root: nn.Module) -> dict[str, list[int]]:
    """The shape each parameter had before sharding (that of its tensor shard), by unwrapped name."""
    return {name: list(full_shape(p)) for name, p in named_unwrapped_parameters(root)}


def unshard(shards: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """One parameter from its flat shards of data ranks 0..D−1 (padding dropped)."""
    flat = torch.cat([s.reshape(-1) for s in shards])
    return flat[:math.prod(shape)].reshape(shape)


def load_shard_state(root: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Put back what `shard_state` saved (same layout); a mismatch is a CheckpointError naming the file."""
    params = dict(named_unwrapped_parameters(root))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    reshaped = [n for n in params if n in state and state[n].shape != params[n].shape]
    if missing or unexpected or reshaped:
        raise CheckpointError(f"{path} does not fit this model (missing: {missing[:3]}, unexpected: "
                              f"{unexpected[:3]}, other shard shapes: {reshaped[:3]}). It was written for another "
                              f"model or data-parallel size: resume with the settings that wrote it, or use a new "
                              f"run.dir.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
