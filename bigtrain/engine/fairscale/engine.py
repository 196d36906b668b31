"""The fairscale engine: a second, independent implementation of sharded data parallelism.

    zero_stage 1   fairscale's OSS: each data-parallel rank keeps the optimizer state of the whole parameters
                   it owns (OSS assigns whole tensors, largest first, to the least-loaded rank); gradients are
                   all-reduced (summed) over the data group after the last micro-batch, the owner updates its
                   parameters and OSS broadcasts them to the other ranks
    zero_stage 2   OSS inside `ShardedDataParallel`: each gradient is reduced to its owner only (the others'
                   are not needed), accumulation runs under `no_sync`
    zero_stage 3   `FullyShardedDataParallel` (`fully_sharded.py`): every block its own unit, parameters
                   sharded per tensor, gathered for a unit's forward and backward only; gradients
                   reduce-scattered after each micro-batch. fairscale runs it on CUDA only

Because OSS shards whole tensors, bigtrain's LAMB computes each trust ratio from a whole parameter (or, under
tensor parallelism, from its shards summed over the tensor group by `ZeroLamb`): exact, as unsharded. Under
FSDP each rank holds a flat piece of every parameter, and `ZeroLamb` sums each piece's squares over the data
group (then the tensor group) into the whole parameter's norms: exact too.

The step is the skeleton's (`engine/step.py`): each micro-batch backpropagates Σ ce / N (N: target tokens of the
whole global batch), and the data-parallel reduction sums (ZeRO-1 equivalent) or averages a loss scaled by N_d
(ShardedDataParallel and FSDP divide by N_d), so every gradient is ∇(Σ_global ce / N), the single-device gradient.

Gradient norm and clipping: ‖g‖² sums the owned parameters' squares (ZeRO-2), or every parameter's shard
(FSDP), over the data group, or takes the all-reduced gradients (ZeRO-1); then over the tensor group
(replicated parameters once), and bigtrain clips. A non-finite step is skipped on the device (`found_inf`).
Weights stay fp32; bf16 runs under autocast (OSS) or FSDP's mixed precision over fp32 master shards.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from bigtrain.compat import fairscale as fairscale_compat
from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.base import ShardedState
from bigtrain.engine.fairscale.files import native_part
from bigtrain.engine.fairscale.fully_sharded import load_shard_state, shard_shapes, shard_state, wrap_fully_sharded
from bigtrain.engine.memory import (
    ModelStateBytes,
    gathered_report,
    measure_grads,
    measure_optimizer,
    measure_params,
    tensor_share_note,
)
from bigtrain.engine.step import StepEngine, step_unless_found_inf
from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.errors import ConfigError
from bigtrain.io import SaveFile, load_state, load_torch, save_torch
from bigtrain.models import count_parameters
from bigtrain.models.loss import model_inputs
from bigtrain.optim import adamw_kwargs, param_groups
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.grad_norm import sharded_grad_norm
from bigtrain.planning.zero import zero_formula

SHARDING = {1: "OSS", 2: "OSS + ShardedDataParallel", 3: "FullyShardedDataParallel"}


def _optimizer_class(cfg: Config, layout: Layout, groups: ParallelGroups, params: list) -> tuple[Any, dict]:
    """The inner optimizer class and its hyper-parameters: bigtrain's exact LAMB, or torch's AdamW."""
    o = cfg.optim
    if o.name == "lamb":
        tensor_group = groups.tensor_group if layout.tensor > 1 else None
        shard_group = groups.data_group if layout.zero_stage == 3 and layout.data > 1 else None  # FSDP: flat shards
        return (functools.partial(ZeroLamb, tensor_group=tensor_group, shard_group=shard_group),
                {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "max_trust_ratio": o.lamb_max_trust_ratio})
    return torch.optim.AdamW, adamw_kwargs(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


class FairscaleEngine(StepEngine):
    config_file = "engine_config.json"

    def __init__(self, cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups,
                 device: torch.device) -> None:
        try:
            from fairscale.optim.oss import OSS
        except ImportError:
            raise ConfigError("parallel.engine=fairscale needs the fairscale package, which is not installed: "
                              "pip install 'bigtrain[fairscale]' (or fairscale>=0.4.13), or use "
                              "parallel.engine=auto.") from None
        self.stage = layout.zero_stage
        if self.stage == 3 and not fairscale_compat.fsdp_runs_on(device.type):
            # the config check refuses train.device=cpu; train.device=auto can still land here
            raise ConfigError(f"parallel.engine=fairscale with parallel.zero_stage=3 means fairscale's "
                              f"FullyShardedDataParallel, which fairscale runs on CUDA GPUs only; this run is on "
                              f"{device}. Use parallel.zero_stage=1 or 2, or parallel.engine=deepspeed for ZeRO-3.")
        self.layout, self.groups, self.device = layout, groups, device
        self.parallel, self.criterion = parallel, parallel.criterion
        self.model = parallel.model
        self.group = groups.data_group
        self.dp_rank, self.dp_size = groups.get_data_parallel_rank(), layout.data
        self.n_params = count_parameters(self.model)
        self.grad_clip = cfg.optim.grad_clip
        optim_class, hyper = _optimizer_class(cfg, layout, groups, list(self.model.parameters()))
        self.wrapped: torch.nn.Module = self.model
        if self.stage == 3:
            groups_by_decay = param_groups(self.model, cfg.optim.weight_decay)  # before sharding: decay goes by ndim
            self.wrapped = wrap_fully_sharded(self.model, self.group, device, bf16=layout.precision == "bf16")
            self.model = self.wrapped  # the root unit runs (and forwards attributes)
            self.optimizer: Any = optim_class(groups_by_decay, **hyper)
            self.inner: torch.optim.Optimizer = self.optimizer  # over this rank's shards of every parameter
        else:
            self.optimizer = OSS(param_groups(self.model, cfg.optim.weight_decay), optim=optim_class, group=self.group,
                                 **hyper)
            self.inner = self.optimizer.optim  # this rank's shard of the parameters
        self.owned = {id(q) for g in self.inner.param_groups for q in g["params"]}
        self.params = [q for g in self.optimizer.param_groups for q in g["params"]]
        if self.stage == 2:
            from fairscale.nn.data_parallel import ShardedDataParallel

            self.wrapped = ShardedDataParallel(self.model, self.optimizer, process_group=self.group,
                                               sync_models_at_startup=False)
        self.last_grad_bytes = 0

    # ---- the step ------------------------------------------------------------------------------------
    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """ZeRO-2: gradients stay local (no reduction to their owners) until the last micro-batch."""
        return self.wrapped.no_sync() if self.stage == 2 and not last else contextlib.nullcontext()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return self.wrapped(**model_inputs(batch))

    @property
    def backward_scale(self) -> float:
        return 1.0 if self.stage == 1 else float(self.dp_size)  # ShardedDataParallel and FSDP average, ZeRO-1 sums

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss * self.backward_scale).backward()
        self.last_grad_bytes = max(self.last_grad_bytes, measure_grads(self.model, self.optimizer))

    def gradients_done(self) -> None:
        """ZeRO-1 equivalent: Σ over the data group of every gradient, in one flat collective."""
        grads = [q.grad for q in self.params if q.grad is not None]
        if self.stage != 1 or self.dp_size == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(reduced)

    def measure_norm(self) -> torch.Tensor:
        """ZeRO-1: every (all-reduced) gradient; ZeRO-2: the owned ones; FSDP: this rank's shard of every one;
        then clipped."""
        owned = [q for q in self.params if id(q) in self.owned] if self.stage == 2 else self.params
        norm = sharded_grad_norm(owned, self.groups, self.device, self.group if self.stage >= 2 else None)
        if self.grad_clip > 0:
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            for q in owned:
                if q.grad is not None:
                    q.grad.mul_(coef.to(q.grad.dtype))
        return norm.float()

    def update(self, found_inf: torch.Tensor) -> None:
        step_unless_found_inf(self.inner, found_inf, self.optimizer.step)
        # every gradient, owned or not (OSS clears only its shard's; a stale one would be reduced again)
        self.wrapped.zero_grad(set_to_none=True)

    # ---- state ---------------------------------------------------------------------------------------
    def sharded_state(self) -> ShardedState:
        tensor_rank = self.groups.get_tensor_model_parallel_rank()
        if self.stage == 3:  # FSDP: every parameter partitioned flat over the data group (unless it has 1 rank)
            partition = (functools.partial(fairscale_compat.fsdp_partition, rank=self.dp_rank,
                                           world_size=self.dp_size) if self.dp_size > 1 else None)
            return ShardedState(self.model, self.parallel.shards, self.inner, None, tensor_rank=tensor_rank,
                                data_rank=self.dp_rank, partition=partition,
                                params=list(fairscale_compat.named_unwrapped_parameters(self.model)),
                                shape_of=fairscale_compat.full_shape)
        return ShardedState(self.model, self.parallel.shards, self.inner, None, tensor_rank=tensor_rank,
                            data_rank=self.dp_rank, state_owner=lambda q: id(q) in self.owned)

    def write_native(self, folder: Path, save: SaveFile = save_torch) -> None:
        """Every rank its optimizer shard; data rank 0 also the model shard of its tensor rank; under FSDP every
        rank its shard of the parameters, with the shapes they were cut from (for consolidation)."""
        part: dict[str, Any] = {"optimizer": self.inner.state_dict()}
        if self.stage == 3:
            part.update(model=shard_state(self.model), shapes=shard_shapes(self.model))
        else:
            part["model"] = self.model.state_dict() if self.dp_rank == 0 else None
        save(folder / native_part(self.groups.rank), part)

    def read_native(self, checkpoint: Path) -> None:
        rank = self.groups.rank
        own = load_torch(checkpoint / native_part(rank), self.device)
        if self.stage == 3:  # this rank's parameter shards
            load_shard_state(self.model, own["model"], checkpoint / native_part(rank))
        else:  # the model as data rank 0 of this tensor rank saved it
            c = self.groups.coords
            holder = self.layout.rank_of(c.pipe, 0, c.tensor)
            model = own if holder == rank else load_torch(checkpoint / native_part(holder), self.device)
            load_state(self.model, model["model"], checkpoint / native_part(holder))
        self.inner.load_state_dict(own["optimizer"])

    # ---- reports -------------------------------------------------------------------------------------
    def memory_report(self, run_dir: Path | None = None) -> str | None:
        mine = ModelStateBytes(params=measure_params(self.model), grads=self.last_grad_bytes,
                               optimizer=measure_optimizer(self.inner))
        formula = zero_formula(self.n_params, self.stage, self.dp_size, "fp32", master_copy=False)
        grads = "shards, accumulated" if self.stage == 3 else "whole under no_sync accumulation"
        title = (f"model-state memory per rank in step 1 (gradients: peak over its micro-batches, {grads})"
                 f"{tensor_share_note(self.layout.tensor)}\n"
                 f"fairscale {SHARDING[self.stage]} (ZeRO-{self.stage} equivalent), {self.dp_size} data-parallel "
                 f"ranks, fp32 weights, Ψ = {self.n_params} parameters, K = 8 bytes")
        facts = {"engine": "fairscale", "zero_stage": self.stage, "dp_size": self.dp_size, "n_params": self.n_params}
        return gathered_report(mine, formula, title, self.groups.host_data, self.dp_size, self.groups.rank, run_dir,
                               facts)

    def describe(self) -> str:
        fsdp = self.stage == 3
        return json.dumps({"engine": "fairscale", "optimizer_sharding": "FullyShardedDataParallel" if fsdp else "OSS",
                           "gradient_sharding": {1: "all-reduce", 2: "ShardedDataParallel",
                                                 3: "FullyShardedDataParallel"}[self.stage],
                           "parameter_sharding": "FullyShardedDataParallel" if fsdp else "none",
                           "zero_stage": self.stage, "data_parallel_size": self.dp_size,
                           "owned_parameters": len(self.owned), "all_parameters": len(self.params)}, indent=2)
