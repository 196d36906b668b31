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

The loss is the global batch's mean token loss as in the DeepSpeed engine: each micro-batch backpropagates
Σ ce / N (N: target tokens of the whole global batch, one all-reduce of the host counts), and the data-parallel
reduction sums (ZeRO-1 equivalent) or averages a loss scaled by N_d (ShardedDataParallel and FSDP divide by
N_d), so every gradient is ∇(Σ_global ce / N), the single-device gradient.

Gradient norm and clipping: ‖g‖² sums the owned parameters' squares (ZeRO-2), or every parameter's shard
(FSDP), over the data group, or takes the all-reduced gradients (ZeRO-1); then over the tensor group
(replicated parameters once). A non-finite step is skipped on the device (`found_inf`) as in the other engines.
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

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.sequence import restore_layout_free, save_from_every_rank
from bigtrain.checkpoint.state import StateAdapter
from bigtrain.compat import fairscale as fairscale_compat
from bigtrain.config import Config
from bigtrain.distributed import DistEnv
from bigtrain.distributed.device import autocast
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.fairscale.fully_sharded import load_shard_state, shard_shapes, shard_state, wrap_fully_sharded
from bigtrain.engine.memory import (
    ModelStateBytes,
    gathered_report,
    measure_grads,
    measure_optimizer,
    measure_params,
    tensor_share_note,
    zero_formula,
)
from bigtrain.engine.result import StepResult
from bigtrain.engine.step import skips_on_device
from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.errors import ConfigError
from bigtrain.models import TransformerLM, count_parameters
from bigtrain.models.loss import count_input_tokens, count_targets, model_inputs
from bigtrain.optim import adamw_kwargs, param_groups, set_lr
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.grad_norm import sharded_grad_norm


class FairscaleEngine:
    def __init__(self, cfg: Config, parallel: ParallelModel, env: DistEnv, groups: ParallelGroups,
                 device: torch.device) -> None:
        try:
            from fairscale.optim.oss import OSS
        except ImportError:
            raise ConfigError("parallel.engine=fairscale needs the fairscale package, which is not installed: "
                              "pip install 'bigtrain[fairscale]' (or fairscale>=0.4.13), or use "
                              "parallel.engine=auto.") from None
        p = cfg.parallel
        if p.zero_stage == 3 and not fairscale_compat.fsdp_runs_on(device.type):
            # the config check refuses train.device=cpu; train.device=auto can still land here
            raise ConfigError(f"parallel.engine=fairscale with parallel.zero_stage=3 means fairscale's "
                              f"FullyShardedDataParallel, which fairscale runs on CUDA GPUs only; this run is on "
                              f"{device}. Use parallel.zero_stage=1 or 2, or parallel.engine=deepspeed for ZeRO-3.")
        self.cfg, self.env, self.groups, self.device = cfg, env, groups, device
        self.parallel, self.criterion = parallel, parallel.criterion
        self.model: TransformerLM = parallel.model
        self.rank, self.stage = env.rank, p.zero_stage
        self.group = groups.data_group
        self.dp_rank, self.dp_size = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
        self.n_params = count_parameters(self.model)
        self.autocast = lambda: autocast(cfg.train.precision, device)
        o = cfg.optim
        if o.name == "lamb":
            tensor_group = groups.tensor_group if groups.layout.tensor > 1 else None
            shard_group = self.group if p.zero_stage == 3 and self.dp_size > 1 else None  # FSDP: flat shards
            optim_class: Any = functools.partial(ZeroLamb, tensor_group=tensor_group, shard_group=shard_group)
            hyper: dict[str, Any] = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps,
                                     "max_trust_ratio": o.lamb_max_trust_ratio}
        else:
            optim_class, hyper = torch.optim.AdamW, adamw_kwargs(list(self.model.parameters()), lr=o.lr,
                                                                  betas=(o.beta1, o.beta2), eps=o.eps)
        self.forward: torch.nn.Module = self.model
        if self.stage == 3:
            groups_by_decay = param_groups(self.model, o.weight_decay)  # before sharding: decay goes by ndim
            self.forward = wrap_fully_sharded(self.model, self.group, device, bf16=cfg.train.precision == "bf16")
            self.model = self.forward  # type: ignore[assignment]  # the root unit runs (and forwards attributes)
            self.optimizer: Any = optim_class(groups_by_decay, **hyper)
            self.inner: torch.optim.Optimizer = self.optimizer  # over this rank's shards of every parameter
        else:
            self.optimizer = OSS(param_groups(self.model, o.weight_decay), optim=optim_class, group=self.group,
                                 **hyper)
            self.inner = self.optimizer.optim  # this rank's shard of the parameters
        self.owned = {id(q) for g in self.inner.param_groups for q in g["params"]}
        self.params = [q for g in self.optimizer.param_groups for q in g["params"]]
        if self.stage == 2:
            from fairscale.nn.data_parallel import ShardedDataParallel

            self.forward = ShardedDataParallel(self.model, self.optimizer, process_group=self.group,
                                               sync_models_at_startup=False)
        self.last_grad_bytes = 0

    # ---- collectives -----------------------------------------------------------------------------------
    def all_reduce_sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)  # host numbers: gloo or nccl, on the data group
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def _sum_gradients(self) -> None:
        """ZeRO-1 equivalent: Σ over the data group of every gradient, in one flat collective."""
        grads = [q.grad for q in self.params if q.grad is not None]
        if self.dp_size == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(reduced)

    # ---- one step --------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool,
                   counts: tuple[int, int] | None = None) -> StepResult:
        set_lr(self.optimizer, lr)
        local = counts if counts is not None else (sum(count_targets(b) for b in micro_batches),
                                                   sum(count_input_tokens(b) for b in micro_batches))
        n_targets, n_tokens = self.all_reduce_sum(*local)
        scale = 1 if self.stage == 1 else self.dp_size  # ShardedDataParallel and FSDP average, ZeRO-1 sums
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            accumulate = self.stage == 2 and i < last
            with self.forward.no_sync() if accumulate else contextlib.nullcontext():
                with self.autocast():
                    logits = self.forward(**model_inputs(batch))
                loss = self.criterion.loss_sum(logits, batch["labels"]) / n_targets
                (loss * scale).backward()
            total += loss.detach()
            self.last_grad_bytes = max(self.last_grad_bytes, measure_grads(self.model, self.optimizer))
        if self.stage == 1:
            self._sum_gradients()
        dist.all_reduce(total, group=self.group)
        # ZeRO-1: every (all-reduced) gradient; ZeRO-2: the owned ones; FSDP: this rank's shard of every one
        owned = [q for q in self.params if id(q) in self.owned] if self.stage == 2 else self.params
        grad_norm = sharded_grad_norm(owned, self.groups, self.device, self.group if self.stage >= 2 else None)
        if self.cfg.optim.grad_clip > 0:
            coef = (self.cfg.optim.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
            for q in owned:
                if q.grad is not None:
                    q.grad.mul_(coef.to(q.grad.dtype))
        finite = torch.isfinite(total) & torch.isfinite(grad_norm)
        skipped = ~finite
        if skips_on_device(self.inner):
            self.inner.found_inf = skipped.float()
            try:
                self.optimizer.step()
            finally:
                self.inner.found_inf = None
        elif bool(finite):  # an optimizer that cannot skip by itself: decide on the host
            self.optimizer.step()
        # every gradient, owned or not (OSS clears only its shard's; a stale one would be reduced again)
        self.forward.zero_grad(set_to_none=True)
        return StepResult(loss=total, grad_norm=grad_norm.float(), skipped=skipped, finite=finite,
                          tokens=round(n_tokens))

    # ---- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> StateAdapter:
        tensor_rank = self.groups.get_tensor_model_parallel_rank()
        if self.stage == 3:  # FSDP: every parameter partitioned flat over the data group (unless it has 1 rank)
            partition = (functools.partial(fairscale_compat.fsdp_partition, rank=self.dp_rank,
                                           world_size=self.dp_size) if self.dp_size > 1 else None)
            return StateAdapter(self.model, self.parallel.shards, self.inner, None, tensor_rank=tensor_rank,
                                data_rank=self.dp_rank, partition=partition,
                                params=list(fairscale_compat.named_unwrapped_parameters(self.model)),
                                shape_of=fairscale_compat.full_shape)
        return StateAdapter(self.model, self.parallel.shards, self.inner, None, tensor_rank=tensor_rank,
                            data_rank=self.dp_rank, state_owner=lambda q: id(q) in self.owned)

    def _part(self, rank: int) -> str:
        return f"fairscale_rank{rank:05d}"

    def save(self, directory: Path, step: int, trainer_state: dict[str, Any], config_yaml: str,
             keep: int, layout_free: dict[str, Any] | None = None) -> Path:
        """Every rank writes its optimizer shard (data rank 0 also the model shard of its tensor rank; under FSDP
        every rank its shard of the parameters) and its RNG into `step_N.tmp/`; rank 0 makes the directory
        visible once all ranks are done."""
        def write_own(tmp: Path) -> None:
            part: dict[str, Any] = {"optimizer": self.inner.state_dict()}
            if self.stage == 3:  # each rank its shards, with the shapes they were cut from (for consolidation)
                part.update(model=shard_state(self.model), shapes=shard_shapes(self.model))
            else:
                part["model"] = self.model.state_dict() if self.dp_rank == 0 else None
            ckpt.write_part(tmp, self._part(self.rank), part)

        return save_from_every_rank(directory, step, self.rank, self.env.world_size, trainer_state, config_yaml,
                                    keep, write_own, self.state, layout_free)

    def load(self, checkpoint: Path) -> dict[str, Any]:
        own = ckpt.load_part(checkpoint, self._part(self.rank), self.device)
        if self.stage == 3:  # this rank's parameter shards
            load_shard_state(self.model, own["model"], checkpoint / f"{self._part(self.rank)}.pt")
        else:  # the model as data rank 0 of this tensor rank saved it
            c = self.groups.coords
            holder = self.groups.layout.rank_of(c.pipe, 0, c.tensor)
            model = own if holder == self.rank else ckpt.load_part(checkpoint, self._part(holder), self.device)
            ckpt.load_into(self.model, model["model"], checkpoint / f"{self._part(holder)}.pt")
        self.inner.load_state_dict(own["optimizer"])
        trainer = ckpt.load_part(checkpoint, f"trainer_rank{self.rank:05d}")
        ckpt.set_rng_state(trainer["rng"])
        return trainer["state"]

    def load_layout_free(self, checkpoint: Path) -> dict[str, Any]:
        return restore_layout_free(self.state(), checkpoint)

    def init_weights(self, reader: Any) -> None:
        self.state().restore(reader, 0.0)

    # ---- memory ----------------------------------------------------------------------------------------
    def measure(self) -> ModelStateBytes:
        return ModelStateBytes(params=measure_params(self.model), grads=self.last_grad_bytes,
                               optimizer=measure_optimizer(self.inner))

    def memory_report(self, run_dir: Path | None = None) -> str | None:
        formula = zero_formula(self.n_params, self.stage, self.dp_size, "fp32", master_copy=False)
        grads = "shards, accumulated" if self.stage == 3 else "whole under no_sync accumulation"
        title = (f"model-state memory per rank in step 1 (gradients: peak over its micro-batches, {grads})"
                 f"{tensor_share_note(self.groups.layout.tensor)}\n"
                 f"fairscale {self._sharding()} (ZeRO-{self.stage} equivalent), {self.dp_size} data-parallel ranks, "
                 f"fp32 weights, Ψ = {self.n_params} parameters, K = 8 bytes")
        facts = {"engine": "fairscale", "zero_stage": self.stage, "dp_size": self.dp_size, "n_params": self.n_params}
        return gathered_report(self.measure(), formula, title, self.group, self.dp_size, self.rank, run_dir, facts)

    def _sharding(self) -> str:
        return {1: "OSS", 2: "OSS + ShardedDataParallel", 3: "FullyShardedDataParallel"}[self.stage]

    def describe(self) -> str:
        fsdp = self.stage == 3
        return json.dumps({"engine": "fairscale", "optimizer_sharding": "FullyShardedDataParallel" if fsdp else "OSS",
                           "gradient_sharding": {1: "all-reduce", 2: "ShardedDataParallel",
                                                 3: "FullyShardedDataParallel"}[self.stage],
                           "parameter_sharding": "FullyShardedDataParallel" if fsdp else "none",
                           "zero_stage": self.stage, "data_parallel_size": self.dp_size,
                           "owned_parameters": len(self.owned), "all_parameters": len(self.params)}, indent=2)
