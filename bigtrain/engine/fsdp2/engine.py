"""PyTorch's FSDP2 engine (parallel.engine=torch on several ranks): sharded data parallelism by torch itself.

    wrap        `fully_shard` per block and at the root over the data group (`sharding.py`); zero_stage 2:
                parameters stay gathered from forward to backward, 3: gathered again for backward
    backward    (ℓ · D).backward(): FSDP2 averages the reduce-scattered gradients over the D data ranks, so
                every gradient is ∇(Σ_global ce / N), the single-device gradient
    norm        ‖g‖² = Σ over the data group of each rank's rows' squares, then over the tensor group with
                replicated parameters counted once (`sharded_grad_norm`); bigtrain clips
    optimizer   bigtrain's AdamW or exact LAMB over this rank's rows of every parameter (flat views of the
                parameters' own storage, so an update is what FSDP2 gathers next); LAMB's two norms of each
                parameter are summed over the data group, then the tensor group (`ZeroLamb`)
    precision   fp32; bf16 is FSDP2's MixedPrecisionPolicy over fp32 master shards
    own files   fsdp2_rankNNNNN.pt (`files.py`)

Under context parallelism "the data group" above is the gradient group (data × context, D·C ranks): context
ranks hold the same weights and other tokens of the same sequences.

Mixture of experts (`model.moe`; `parallel.expert` = EP, expert groups carved out of the D data ranks): each MoE
block's routed experts (this rank's E / EP) are sharded over the expert-data group of D / EP ranks, the rest over
the data group (`sharding.py`). An expert's gradient on one rank already holds its expert group's tokens (the
all-to-all brings them), scaled by D like every loss here; FSDP2 averages it over the D / EP expert-data ranks,
so the engine divides it by EP more: Σ over every data rank's tokens / N, the single-device gradient. Router
losses join the loss in the step skeleton (`bigtrain.engine.step`). The norm needs no expert group of its own:
the data group is expert × expert-data, and its ranks' rows of all parameters cover every expert once, so the
squares summed over the data group are ‖g‖². Under EP > 1 the engine's own files would not say which rank held
which expert rows, so a checkpoint keeps the state in its layout-free form alone (experts under their own names;
`native_state` False), which any layout resumes.

A non-finite step is skipped on the device (`found_inf`), as in every engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bigtrain.compat.deepspeed import Partition
from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.base import ShardedState
from bigtrain.engine.fsdp2.files import native_part
from bigtrain.engine.fsdp2.sharding import LocalShard, local_shards, shard_model
from bigtrain.engine.memory import ModelStateBytes, gathered_report, measure_optimizer, tensor_bytes, tensor_share_note
from bigtrain.engine.step import StepEngine, step_unless_found_inf
from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.errors import CheckpointError
from bigtrain.io import SaveFile, load_torch, save_torch
from bigtrain.models import count_parameters
from bigtrain.models.inspect import model_piece
from bigtrain.models.loss import model_inputs
from bigtrain.models.moe import moe_layers
from bigtrain.optim import param_groups
from bigtrain.optim.build import adamw
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.expert import is_expert_parallel
from bigtrain.parallel.grad_norm import sharded_grad_norm
from bigtrain.planning.zero import zero_formula

RESHARD = {2: False, 3: True}  # zero_stage -> fully_shard's reshard_after_forward


def _optimizer(cfg: Config, layout: Layout, groups: ParallelGroups, by_decay: list[dict[str, Any]]) -> Any:
    """bigtrain's AdamW, or LAMB whose norms are summed over the data group (and the tensor group)."""
    o = cfg.optim
    if o.name == "lamb":
        return ZeroLamb(by_decay, tensor_group=groups.tensor_group if layout.tensor > 1 else None,
                        shard_group=groups.gradient_group if layout.data * layout.context > 1 else None, lr=o.lr,
                        betas=(o.beta1, o.beta2), eps=o.eps, max_trust_ratio=o.lamb_max_trust_ratio)
    return adamw(by_decay, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


class Fsdp2Engine(StepEngine):
    config_file = "engine_config.json"

    def __init__(self, cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups,
                 device: torch.device) -> None:
        self.layout, self.groups, self.device = layout, groups, device
        self.parallel, self.criterion = parallel, parallel.criterion
        self.model = parallel.model
        # the mesh: the gradient group (data × context: context ranks hold the same weights, other tokens)
        self.group, self.context = groups.gradient_group, parallel.context
        self.dp_rank, self.dp_size = groups.get_data_parallel_rank(), layout.data
        self.reduce_rank, self.reduce_size = groups.gradient_rank, layout.data * layout.context
        # Ψ of the whole model: this rank holds E / EP routed experts of each block; a rank keeps Ψ / D at rest
        # either way (its experts' rows are 1 / (D / EP) of E / EP experts)
        self.n_params = count_parameters(self.model) + (layout.expert - 1) * sum(
            p.numel() for p in self.model.parameters() if is_expert_parallel(p))
        self.grad_clip = cfg.optim.grad_clip
        self.expert, self.native_state = layout.expert, layout.expert == 1  # module docstring
        names = {id(p): n for n, p in self.model.named_parameters()}
        shapes = {n: p.shape for n, p in self.model.named_parameters()}
        routed = {n for n, p in self.model.named_parameters() if is_expert_parallel(p)}  # marks go with sharding
        decay_groups = [{**g, "params": [names[id(p)] for p in g["params"]]}  # decay goes by ndim: before sharding
                        for g in param_groups(self.model, cfg.optim.weight_decay)]
        shard_model(self.model, self.group, device, RESHARD[layout.zero_stage], bf16=layout.precision == "bf16",
                    expert_group=groups.expert_data_group)
        expert_data = (groups.expert_data_rank, layout.data // layout.expert)
        self.shards: list[LocalShard] = local_shards(
            self.model.named_parameters(), shapes,
            lambda n: expert_data if n in routed else (self.reduce_rank, self.reduce_size))
        self.routed = [s for s in self.shards if s.name in routed]
        by_name = {s.name: s for s in self.shards}
        for s in self.shards:
            s.values.tensor_model_parallel = s.name in parallel.shards  # norms sum these over the tensor group
        self.values = [s.values for s in self.shards]
        self.optimizer: Any = _optimizer(cfg, layout, groups, [
            {**g, "params": [by_name[n].values for n in g["params"]]} for g in decay_groups])
        self.of_values = {id(s.values): s for s in self.shards}
        self.last_grad_bytes = 0

    # ---- the step ------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return self.model(**model_inputs(batch))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss * self.reduce_size).backward()  # FSDP2 averages over its mesh (data × context)
        self.last_grad_bytes = max(self.last_grad_bytes, tensor_bytes(
            s.param.grad.to_local() for s in self.shards if s.param.grad is not None))

    def gradients_done(self) -> None:
        for s in self.shards:
            s.link_grad()
        if self.expert > 1:  # FSDP2 divided them by D / EP, the expert-data group's size: ÷ D in all
            for s in self.routed:
                if s.values.grad is not None:
                    s.values.grad.div_(self.expert)

    def measure_norm(self) -> torch.Tensor:
        """Each rank's rows of every parameter, summed over the data group, then the tensor group; clipped."""
        norm = sharded_grad_norm(self.values, self.groups, self.device, self.group)
        if self.grad_clip > 0:
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            for v in self.values:
                if v.grad is not None:
                    v.grad.mul_(coef.to(v.grad.dtype))
        return norm.float()

    def layer_norms(self) -> dict[str, float]:
        """‖g‖ of each piece (embed, every block, head), whole across the data and tensor groups."""
        by_piece: dict[str, list[torch.Tensor]] = {}
        for s in self.shards:
            by_piece.setdefault(model_piece(s.name), []).append(s.values)
        return {k: float(sharded_grad_norm(by_piece[k], self.groups, self.device, self.group))
                for k in sorted(by_piece)}

    def update(self, found_inf: torch.Tensor) -> None:
        step_unless_found_inf(self.optimizer, found_inf)
        for v in self.values:
            v.grad = None
        self.model.zero_grad(set_to_none=True)

    # ---- state ---------------------------------------------------------------------------------------
    def _partition(self, values: torch.Tensor) -> Partition:
        return Partition(flat=values, flat_start=0, param_start=self.of_values[id(values)].start,
                         numel=values.numel())

    def sharded_state(self) -> ShardedState:
        return ShardedState(self.model, self.parallel.shards, self.optimizer, None,
                            tensor_rank=self.groups.get_tensor_model_parallel_rank(), data_rank=self.reduce_rank,
                            partition=self._partition, params=[(s.name, s.values) for s in self.shards],
                            shape_of=lambda values: self.of_values[id(values)].shape)

    def write_native(self, folder: Path, save: SaveFile = save_torch) -> None:
        """Every rank its rows of every parameter, the shapes they were cut from, and its optimizer state (nothing
        under expert parallelism: the layout-free form holds the state)."""
        if not self.native_state:
            return
        save(folder / native_part(self.groups.rank), {
            "model": {s.name: s.values.detach() for s in self.shards},
            "shapes": {s.name: list(s.shape) for s in self.shards},
            "optimizer": self.optimizer.state_dict()})

    def read_native(self, checkpoint: Path) -> None:
        if not self.native_state:
            raise CheckpointError(f"{checkpoint}: under expert parallelism (parallel.expert={self.expert}) a "
                                  f"checkpoint's state is its layout-free form; the engine's own files are not "
                                  f"written.")
        path = checkpoint / native_part(self.groups.rank)
        own = load_torch(path, self.device)
        mine = {s.name: s for s in self.shards}
        model = own["model"]
        wrong = sorted(set(mine) ^ set(model)) + [n for n in mine if n in model and
                                                  model[n].shape != mine[n].values.shape]
        if wrong:
            raise CheckpointError(f"{path} does not fit this model (parameters {wrong[:3]} differ): it was written "
                                  f"for another model or data-parallel size. Resume with the settings that wrote "
                                  f"it, or use a new run.dir.")
        with torch.no_grad():
            for name, s in mine.items():
                s.values.copy_(model[name])
        self.optimizer.load_state_dict(own["optimizer"])

    # ---- reports -------------------------------------------------------------------------------------
    def memory_report(self, run_dir: Path | None = None) -> str | None:
        mine = ModelStateBytes(params=tensor_bytes(self.values), grads=self.last_grad_bytes,
                               optimizer=measure_optimizer(self.optimizer))
        # at rest both stages keep 1/D of every parameter: ZeRO-3's formula (4Ψ + 4Ψ + 8Ψ) / D
        formula = zero_formula(self.n_params, 3, self.dp_size, "fp32", master_copy=False)
        title = (f"model-state memory per rank in step 1 (gradients: peak over its micro-batches, shards)"
                 f"{tensor_share_note(self.layout.tensor)}\n"
                 f"PyTorch FSDP2 (ZeRO-{self.layout.zero_stage}: parameters, gradients and optimizer state "
                 f"sharded), {self.dp_size} data-parallel ranks, fp32 master weights, Ψ = {self.n_params} "
                 f"parameters, K = 8 bytes")
        facts = {"engine": "fsdp2", "zero_stage": self.layout.zero_stage, "dp_size": self.dp_size,
                 "n_params": self.n_params}
        return gathered_report(mine, formula, title, self.groups.host_data, self.dp_size, self.groups.rank, run_dir,
                               facts)

    def describe(self) -> str:
        return json.dumps({"engine": "fsdp2", "zero_stage": self.layout.zero_stage,
                           "reshard_after_forward": RESHARD[self.layout.zero_stage],
                           "data_parallel_size": self.dp_size, "expert_parallel_size": self.expert,
                           "units": 1 + sum(len(s) for s in self.model.stacks()) + len(moe_layers(self.model)),
                           "precision": self.layout.precision, "parameters": len(self.shards)}, indent=2)

