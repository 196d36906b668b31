"""FSDP2 (`fully_shard`) around bigtrain's model, and the flat local shards the rest of the engine works on.

    units      every block is its own unit (`fully_shard(block)`) and the model is the root unit (embedding, head,
               final norm, position bias; tied weights stay together there): a unit's parameters are all-gathered
               over the data group before its forward and again before its backward
    resharding zero_stage 3: `reshard_after_forward=True`, a unit's gathered parameters are freed after its
               forward and gathered again for its backward (a rank keeps 1/D of every parameter at rest);
               zero_stage 2: `reshard_after_forward=False`, they stay gathered from forward to backward
    experts    MoE blocks (always in their expert-parallel form here, `bigtrain.parallel.expert`): each block's
               routed experts (`LocalExperts`, this rank's E / EP of them) are a unit of their own, sharded over
               the expert-data group (the D / EP data ranks holding the same experts; the data group when EP = 1)
               before the block is sharded over the data group; the router and shared experts stay in the block
    sharding   dimension 0 of every parameter, as torch.chunk: rank r of the parameter's group holds rows
               [r·c, r·c + c), c = ⌈n/G⌉ (G = D, or D / EP for routed experts), i.e. one contiguous range of the
               flattened parameter (`LocalShard.start`)
    gradients  reduce-scattered over the unit's group after each micro-batch's backward and averaged (÷ D, or
               ÷ D / EP for routed experts: the engine divides those by EP more); each rank accumulates only its rows
    precision  fp32: everything fp32. bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) — fp32
               master shards (what the optimizer updates), parameters gathered and computed in bf16, gradients
               reduce-scattered in fp32

The mesh is the layout's data group (one dimension), so FSDP2 composes with bigtrain's tensor parallelism: on each
tensor rank it shards that rank's tensor shards over the data group. The optimizer, the norms and the checkpoints
see each parameter as `LocalShard.values`: this rank's rows, flat, in the parameter's own storage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bigtrain.compat.fsdp2 import data_mesh, fully_shard_api, local_grad, local_values, row_range
from bigtrain.models import TransformerLM
from bigtrain.parallel.expert import ExpertParallelMoE


@dataclass
class LocalShard:
    """One parameter on this rank: its name in the unwrapped model, the sharded parameter (a DTensor), this
    rank's values of it (flat, sharing its storage), the shape it was cut from (that of its tensor shard) and
    where the values start in the flattened parameter."""

    name: str
    param: nn.Parameter
    values: torch.Tensor
    shape: torch.Size
    start: int

    def link_grad(self) -> None:
        """Point `values.grad` at this rank's rows of the parameter's reduced gradient (what the optimizer reads)."""
        self.values.grad = local_grad(self.param)


def shard_model(model: TransformerLM, group: object, device: torch.device, reshard_after_forward: bool,
                bf16: bool, expert_group: object = None) -> None:
    """Each block its own FSDP2 unit, inside the root unit (the model), and each MoE block's routed experts a unit
    inside their block, over `expert_group` (the expert-data group); parameters are sharded in place."""
    fully_shard, MixedPrecisionPolicy = fully_shard_api()
    mesh = data_mesh(group, device.type)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    experts = [m.experts for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    if experts:
        expert_mesh = data_mesh(expert_group, device.type)
        for unit in experts:
            fully_shard(unit, mesh=expert_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    for stack in model.stacks():
        for block in stack:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)


def local_shards(named: Iterable[tuple[str, nn.Parameter]], shapes: dict[str, torch.Size],
                 place: Callable[[str], tuple[int, int]]) -> list[LocalShard]:
    """This rank's shard of every sharded parameter in `named` (a sharded model's `named_parameters()`: tied ones
    once), by name; `shapes`: each parameter's shape before sharding; `place(name)`: (this rank's index, size) of
    the group the parameter is sharded over."""
    shards = []
    for name, p in named:
        shape = shapes[name]
        data_rank, data_size = place(name)
        values = local_values(p)
        first, rows = row_range(shape[0], data_rank, data_size)
        row = shape[1:].numel()
        if values.numel() != rows * row:
            raise RuntimeError(f"FSDP2 gave data rank {data_rank} {values.numel()} values of {name} {list(shape)}; "
                               f"torch.chunk's split says {rows} rows of {row}")
        shards.append(LocalShard(name, p, values, shape, first * row))
    return shards
