"""DeepSpeed around bigtrain's model and optimizer, as both DeepSpeed engines (data parallel / ZeRO, and the
pipeline) hold it: `deepspeed.initialize` with the derived config, exact LAMB under ZeRO, the non-finite
decision handed to the inner optimizer, DeepSpeed's own checkpoint files, and where the state lives.

What DeepSpeed does inside `backward` / `step` is its own: its ZeRO and bf16 optimizers check their gradient
norm on the host (`is_invalid_grad_norm`, one read per step) and skip a non-finite one themselves, and fp16's
dynamic loss scaling must read its overflow flag every step. A step that bigtrain finds non-finite is skipped
on the device: just before the inner optimizer updates, its step pre-hook gives it the step's `found_inf`
(torch's fused AdamW and bigtrain's LAMB then leave weights and state bitwise unchanged, as under a loss scaler),
while DeepSpeed's own bookkeeping goes on as usual. An optimizer that cannot skip by itself gets the decision on
the host instead (its gradients are dropped), which waits for the device.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from bigtrain.compat.deepspeed import (
    checkpoint_files_through,
    has_zero_partitions,
    inner_optimizer,
    safe_checkpoint_loading,
    take_gradient_reduction,
)
from bigtrain.compat.deepspeed_import import import_deepspeed
from bigtrain.config import Config
from bigtrain.config.deepspeed import derive_deepspeed_config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import GradientMpu, ParallelGroups
from bigtrain.engine.base import ShardedState
from bigtrain.engine.step import StepEngine, skips_on_device
from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.errors import CheckpointError, ConfigError
from bigtrain.io import SaveFile, load_failure, save_torch
from bigtrain.models import count_parameters
from bigtrain.optim import build_optimizer
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.expert import is_expert_parallel


def device_norm(norm: float | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A gradient norm as reported by DeepSpeed (a tensor, a float, or None when not measured: NaN) as a 0-dim
    float64 tensor on `device`, made without a host-to-device copy."""
    if isinstance(norm, torch.Tensor):
        return norm.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.full((), math.nan if norm is None else norm, dtype=torch.float64, device=device)


class DeepSpeedWrap:
    """`found_inf()` gives the current step's decision when the inner optimizer is about to update (the engine
    makes it there, or before); `mpu`: DeepSpeed gets bigtrain's groups (the pipeline's `PipelineModule` brings
    its own grid instead)."""

    def __init__(self, cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups,
                 found_inf: Callable[[], torch.Tensor], mpu: bool) -> None:
        deepspeed = import_deepspeed()

        self.parallel, self.groups, self.found_inf = parallel, groups, found_inf
        model = parallel.module
        on_gpu = any(p.is_cuda for p in model.parameters())
        self.config = derive_deepspeed_config(cfg, layout.data, on_gpu=on_gpu, context=layout.context)
        self.n_params = count_parameters(model)  # before ZeRO-3 replaces parameters by empty placeholders
        tensor_group = groups.tensor_group if layout.tensor > 1 else None
        optimizer = build_optimizer(model, cfg.optim, lamb_class=functools.partial(ZeroLamb, tensor_group=tensor_group))
        # Under context parallelism DeepSpeed's data-parallel group is the gradient group (data × context).
        view = GradientMpu(groups) if layout.context > 1 else groups
        # DeepSpeed broadcasts data rank 0's weights at start; under expert parallelism the ranks of an expert
        # group hold different experts, which are put back afterwards.
        routed = [(p, p.detach().clone()) for p in model.parameters() if is_expert_parallel(p)]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                                 mpu=view if mpu else None)
        with torch.no_grad():
            for p, value in routed:
                p.copy_(value)
        if layout.expert > 1:
            take_gradient_reduction(self.engine)  # the engine reduces experts and the rest over their own groups
        # Without a ZeRO / mixed-precision wrapper DeepSpeed clips fp32 gradients but does not report the norm:
        # bigtrain measures it on the all-reduced gradients just before the update.
        self.unwrapped = self.optimizer is optimizer
        if isinstance(optimizer, ZeroLamb) and not self.unwrapped:
            if not has_zero_partitions(self.optimizer):
                raise ConfigError(
                    f"optim.name='lamb' cannot be made exact with DeepSpeed's {type(self.optimizer).__name__} "
                    f"(zero_stage={layout.zero_stage}, precision={layout.precision}). Use "
                    f"parallel.zero_stage=1 or 2, or optim.name=adamw.")
            optimizer.attach_zero_partitions(self.optimizer, groups.gradient_group)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_update(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_update(opt))

    def _before_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Just before the inner optimizer updates (DeepSpeed may step it once per parameter group): skip the
        update on the device when the step was found non-finite, or, for an optimizer that cannot skip by
        itself, drop its gradients after reading the decision on the host."""
        found_inf = self.found_inf()
        if skips_on_device(optimizer):
            optimizer.found_inf = found_inf
        elif bool(found_inf):  # waits for the device: only optimizers without `found_inf` get here
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimizers (and bigtrain's LAMB) leave parameters without a gradient alone

    def _after_update(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(optimizer, "found_inf", None) is not None:
            optimizer.found_inf = None

    # ---- after an update -----------------------------------------------------------------------------
    def reported_norm(self) -> torch.Tensor:
        return device_norm(self.engine.get_global_grad_norm(), self.engine.device)

    def update_skipped(self) -> bool:
        return not self.engine.was_step_applied()

    # ---- state ---------------------------------------------------------------------------------------
    def sharded_state(self) -> ShardedState:
        wrapper = None if self.unwrapped else self.optimizer
        inner = self.optimizer if self.unwrapped else inner_optimizer(self.optimizer)
        return ShardedState(self.parallel.model, self.parallel.shards, inner, wrapper,
                            tensor_rank=self.groups.get_tensor_model_parallel_rank(),
                            data_rank=self.groups.gradient_rank,  # DeepSpeed's data rank: data × context
                            state_writer=self._state_writer() if self.groups.layout.expert > 1 else None)

    def _state_writer(self) -> Callable[[torch.Tensor], bool]:
        """Expert parallelism: data rank d < EP writes its routed experts (the first rank of their expert-data
        group), data rank 0 everything else."""
        data, ep = self.groups.coords.data, self.groups.layout.expert
        return lambda p: data < ep if is_expert_parallel(p) else data == 0

    def write_native(self, folder: Path, save: SaveFile = save_torch) -> None:
        """DeepSpeed writes its sharded files into `folder` (every rank its own); with another `save`, each file
        DeepSpeed's checkpoint engine would write goes through it instead."""
        with checkpoint_files_through(self.engine, None if save is save_torch else save):
            self.engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state={}, save_latest=False)

    def read_native(self, checkpoint: Path) -> None:
        try:
            with safe_checkpoint_loading():  # DeepSpeed's own torch.load calls: no code from any file runs
                load_path, _ = self.engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as exc:  # a refused pickle, a truncated or foreign file
            raise CheckpointError(
                f"DeepSpeed could not load the checkpoint in {checkpoint} ({load_failure(exc)}). Its "
                f"files are damaged, were not written by bigtrain, or hold objects that are not plain data (which "
                f"are refused). Point {checkpoint.parent / 'latest'} at an older step, or use a new run.dir.") from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {checkpoint}.")


class OnDeepSpeed(StepEngine):
    """What both DeepSpeed engines answer the same way, from the `DeepSpeedWrap` they hold (`self.ds`): the norm
    and skip DeepSpeed's optimizer reports, where the state lives, DeepSpeed's own files (none under expert
    parallelism: `native_state` False, the layout-free form holds the state), the derived config."""

    ds: DeepSpeedWrap
    config_file = "deepspeed_config.json"

    def reported_norm(self) -> torch.Tensor:
        return self.ds.reported_norm()

    def update_skipped(self) -> bool:
        return self.ds.update_skipped()

    def sharded_state(self) -> ShardedState:
        return self.ds.sharded_state()

    def write_native(self, folder: Path, save: SaveFile = save_torch) -> None:
        if self.native_state:  # under expert parallelism the layout-free form holds the state
            self.ds.write_native(folder, save)

    def read_native(self, checkpoint: Path) -> None:
        if not self.native_state:
            raise CheckpointError(f"{checkpoint}: under expert parallelism (parallel.expert="
                                  f"{self.ds.groups.layout.expert}) a checkpoint's state is its layout-free form; "
                                  f"DeepSpeed's own files are not written.")
        self.ds.read_native(checkpoint)

    def describe(self) -> str:
        return json.dumps(self.ds.config, indent=2, sort_keys=True)
