"""The DeepSpeed engine: data parallelism and ZeRO 0-3 over a process group (gloo on CPU, nccl on GPU).

Loss scaling keeps the logged loss and the gradient those of the whole global batch: each rank counts its
target tokens, one all-reduce gives N (global), and each micro-batch backpropagates Σ ce / N · N_d with
DeepSpeed's division by gradient-accumulation steps turned off; DeepSpeed's data-parallel averaging then
divides by N_d, so every rank's gradient is ∇(Σ_global ce / N) — the single-device gradient.

The process groups come from one `ParallelGroups` (also DeepSpeed's `mpu`): data parallelism and ZeRO act
over the data group; under tensor parallelism each rank of a tensor group holds one shard of the model.

No step waits for the device in bigtrain's code (issue 15); the trainer reads a step's values at log steps:
- The token counts are host integers (counted before the batch moved to the device) and are summed over the
  data-parallel ranks on a CPU (gloo) group: the data group itself on CPU, a gloo twin of it on GPUs. N is
  then a Python number, exactly as before, and `StepResult.tokens` an int, without touching the device.
- The loss, the gradient norm and the finite flags stay 0-dim device tensors; the lowest rank with a
  non-finite loss is one all-reduce (MIN) over all ranks on the device (`StepCheck`), resolved with the rest.
- A step whose loss (on any rank) or gradient norm is not finite is skipped on the device: just before the
  inner optimizer updates, its step pre-hook gives it `found_inf` (torch's fused AdamW and bigtrain's LAMB
  then leave weights and state bitwise unchanged, as under a loss scaler), while DeepSpeed's own bookkeeping
  goes on as usual. An optimizer that cannot skip by itself (`skips_on_device` false) gets the decision on
  the host instead (its gradients are dropped), which waits for the device.
What DeepSpeed does inside `backward` / `step` is its own: its ZeRO and bf16 optimizers check their gradient
norm on the host (`is_invalid_grad_norm`, one read per step) and skip a non-finite one themselves, and fp16's
dynamic loss scaling must read its overflow flag every step. `get_global_grad_norm()` returns a device tensor
(or the float inf after such a skip), which is kept as it is.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.sequence import restore_layout_free, save_from_every_rank
from bigtrain.checkpoint.state import StateAdapter
from bigtrain.compat.deepspeed import has_zero_partitions, inner_optimizer, safe_checkpoint_loading
from bigtrain.config import Config
from bigtrain.config.deepspeed import derive_deepspeed_config
from bigtrain.distributed import DistEnv
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.memory import (
    ModelStateBytes,
    gathered_report,
    measure_grads,
    measure_optimizer,
    measure_params,
    tensor_share_note,
    zero_formula,
)
from bigtrain.engine.result import NO_RANK, StepResult
from bigtrain.engine.step import skips_on_device
from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.errors import CheckpointError, ConfigError
from bigtrain.models import TransformerLM, count_parameters
from bigtrain.models.loss import count_input_tokens, count_targets, model_inputs
from bigtrain.optim import build_optimizer, set_lr
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.grad_norm import global_grad_norm, piece_grad_norms


@dataclass(frozen=True)
class StepCheck:
    """A step's non-finite decision, on the device and the same on every rank (nothing here is read)."""

    first_bad: torch.Tensor  # int64, 0-dim: the lowest rank whose own loss was not finite, or NO_RANK
    found_inf: torch.Tensor  # float32, 0-dim: 1 = skip the update (the form torch's fused optimizers take)


def host_data_group(groups: ParallelGroups, on_gpu: bool, timeout_s: float) -> dist.ProcessGroup:
    """This rank's data-parallel group for host (CPU) tensors: the data group itself on CPU (gloo), else a gloo
    twin of it (collective: every rank creates all of them, in the same order)."""
    if not on_gpu:
        return groups.data_group
    timeout = datetime.timedelta(seconds=timeout_s)
    mine = None
    for ranks in groups.layout.data_groups():
        group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
        if groups.rank in ranks:
            mine = group
    assert mine is not None, f"rank {groups.rank} is in no data group"
    return mine


def device_norm(norm: float | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A gradient norm as reported by DeepSpeed (a tensor, a float, or None when not measured: NaN) as a 0-dim
    float64 tensor on `device`, made without a host-to-device copy."""
    if isinstance(norm, torch.Tensor):
        return norm.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.full((), math.nan if norm is None else norm, dtype=torch.float64, device=device)


class DeepSpeedEngine:
    uses_mpu = True  # the pipeline engine's PipelineModule brings DeepSpeed its own grid instead

    def __init__(self, cfg: Config, parallel: ParallelModel, env: DistEnv, groups: ParallelGroups) -> None:
        import deepspeed

        self.cfg, self.env, self.groups = cfg, env, groups
        self.criterion, self.parallel = parallel.criterion, parallel
        model = parallel.module
        self.rank = env.rank
        self.dp_rank, self.dp_size = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
        self.group = groups.data_group
        on_gpu = any(p.is_cuda for p in model.parameters())
        self.ds_config = derive_deepspeed_config(cfg, self.dp_size, on_gpu=on_gpu)
        self.n_params = count_parameters(model)  # before ZeRO-3 replaces parameters by empty placeholders
        tensor_group = groups.tensor_group if groups.layout.tensor > 1 else None
        optimizer = build_optimizer(model, cfg.optim,
                                    lamb_class=functools.partial(ZeroLamb, tensor_group=tensor_group))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config,
                                                                 mpu=groups if self.uses_mpu else None)
        self.model: TransformerLM = self.engine.module
        # Without a ZeRO / mixed-precision wrapper DeepSpeed clips fp32 gradients but does not report the
        # norm; bigtrain then measures it on the all-reduced gradients just before the update.
        self.unwrapped = self.optimizer is optimizer
        if isinstance(optimizer, ZeroLamb) and not self.unwrapped:
            if not has_zero_partitions(self.optimizer):
                raise ConfigError(
                    f"optim.name='lamb' cannot be made exact with DeepSpeed's {type(self.optimizer).__name__} "
                    f"(zero_stage={cfg.parallel.zero_stage}, precision={cfg.train.precision}). Use "
                    f"parallel.zero_stage=1 or 2, or optim.name=adamw.")
            optimizer.attach_zero_partitions(self.optimizer, self.group)
        self.last_grad_bytes: int | None = None
        self.measure_grads = True  # only for the first step, which the memory report describes
        self.device = self.engine.device
        self.host_group = host_data_group(groups, on_gpu, cfg.parallel.collective_timeout)
        # A non-finite step never changes the weights or the optimizer state: the inner optimizer's pre-step hook
        # gives it the step's `found_inf` (`_before_update`), and the post-step hook takes it back.
        self.check: StepCheck | None = None  # the current step's decision, once made
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_update(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_update(opt))

    def _before_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Just before the inner optimizer updates (DeepSpeed may step it once per parameter group): skip the
        update on the device when the step was found non-finite, or, for an optimizer that cannot skip by
        itself, drop its gradients after reading the decision on the host."""
        check = self.check if self.check is not None else self._check_in_update()
        if skips_on_device(optimizer):
            optimizer.found_inf = check.found_inf
        elif bool(check.found_inf):  # waits for the device: only optimizers without `found_inf` get here
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimizers (and bigtrain's LAMB) leave parameters without a gradient alone

    def _after_update(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(optimizer, "found_inf", None) is not None:
            optimizer.found_inf = None

    def _check_in_update(self) -> StepCheck:
        """The decision made inside the update, for an engine that cannot make it before (the pipeline)."""
        raise RuntimeError("the optimizer stepped before the step's non-finite check was made")

    def world_check(self, locally_finite: torch.Tensor, bad: torch.Tensor) -> StepCheck:
        """The step's decision from this rank's loss finiteness and `bad` (a bool tensor the same on every rank:
        the global loss or gradient norm is not finite): one all-reduce (MIN) of a rank number over all ranks,
        on the device, so every rank decides the same without reading anything."""
        world = self.env.world_size
        flag = torch.where(locally_finite, world, self.rank).to(device=self.device, dtype=torch.int64).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        flag = flag.reshape(())
        seen = flag < world
        return StepCheck(first_bad=torch.where(seen, flag, NO_RANK), found_inf=(seen | bad).float())

    # ---- collectives ---------------------------------------------------------------------------------
    def global_counts(self, micro_batches: list[dict[str, torch.Tensor]],
                      counts: tuple[int, int] | None) -> tuple[int, int]:
        """(target tokens, input tokens) of the whole global batch: this rank's `counts` (counted on the host
        before the batch moved to the device; else counted here, which waits for the device) summed over the
        data-parallel ranks on the host group, so nothing waits for the device."""
        local = counts if counts is not None else (sum(count_targets(b) for b in micro_batches),
                                                   sum(count_input_tokens(b) for b in micro_batches))
        t = torch.tensor(local, dtype=torch.int64)
        dist.all_reduce(t, group=self.host_group)
        n_targets, n_tokens = t.tolist()  # a host tensor: no device involved
        return n_targets, n_tokens

    def sum_over_data(self, value: torch.Tensor) -> torch.Tensor:
        """Σ over the data-parallel ranks of a 0-dim device value, in float64, on the device."""
        t = value.detach().double().reshape(1)
        dist.all_reduce(t, group=self.group)
        return t.reshape(())

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    # ---- one step ------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool,
                   counts: tuple[int, int] | None = None) -> StepResult:
        set_lr(self.optimizer, lr)
        self.check = None
        n_targets, n_tokens = self.global_counts(micro_batches, counts)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        loss_value, grad_norm, layer_grad_norms = total, None, None
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            logits = self.engine(**model_inputs(batch))
            loss = self.criterion.loss_sum(logits, batch["labels"]) / n_targets
            self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
            total += loss.detach()
            if self.measure_grads:  # peak gradient bytes over the step (ZeRO-1 frees full gradients at the end)
                self.last_grad_bytes = max(self.last_grad_bytes or 0, measure_grads(self.model, self.optimizer))
            if i == last:  # the step's decision, before `step` updates
                loss_value = self.sum_over_data(total)
                bad = ~torch.isfinite(loss_value)
                if self.unwrapped:  # gradients are complete and averaged here (ZeRO-0 all-reduces in backward)
                    grad_norm = global_grad_norm(self.model.parameters(), self.groups, self.device)
                    bad |= ~torch.isfinite(grad_norm)
                    if layer_norms:  # log steps only: read on the host
                        layer_grad_norms = piece_grad_norms(self.model, self.groups)
                self.check = self.world_check(torch.isfinite(total), bad)
            self.engine.step()
        return self.step_result(loss_value, grad_norm, n_tokens, layer_grad_norms)

    def step_result(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, tokens: int,
                    layer_grad_norms: dict[str, float] | None = None) -> StepResult:
        """The step's result, its values left on the device; `grad_norm` None: DeepSpeed's measured norm. The
        update was skipped when the step's check said so or when DeepSpeed skipped it (its host flag)."""
        check, self.check = self.check, None
        assert check is not None, "the step ended without its non-finite check"
        if grad_norm is None:
            grad_norm = device_norm(self.engine.get_global_grad_norm(), self.device)
        skipped = check.found_inf > 0
        if not self.engine.was_step_applied():
            skipped = torch.ones_like(skipped)
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=skipped,
                          finite=torch.isfinite(loss) & torch.isfinite(grad_norm),
                          layer_grad_norms=layer_grad_norms, tokens=tokens, nonfinite_rank=check.first_bad)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> StateAdapter:
        wrapper = None if self.unwrapped else self.optimizer
        inner = self.optimizer if self.unwrapped else inner_optimizer(self.optimizer)
        return StateAdapter(self.parallel.model, self.parallel.shards, inner, wrapper,
                            tensor_rank=self.groups.get_tensor_model_parallel_rank(), data_rank=self.dp_rank)

    def save(self, directory: Path, step: int, trainer_state: dict[str, Any], config_yaml: str,
             keep: int, layout_free: dict[str, Any] | None = None) -> Path:
        """DeepSpeed writes its sharded files into `step_N.tmp/`, every rank adds its RNG state, and rank 0
        makes the directory visible only after all ranks are done."""
        def write_own(tmp: Path) -> None:
            with ckpt.writing(tmp / "(DeepSpeed's files)"):
                self.engine.save_checkpoint(str(directory), tag=tmp.name, client_state={}, save_latest=False)

        return save_from_every_rank(directory, step, self.rank, self.env.world_size, trainer_state, config_yaml,
                                    keep, write_own, self.state, layout_free)

    def load(self, checkpoint: Path) -> dict[str, Any]:
        part = f"trainer_rank{self.rank:05d}"
        if (checkpoint / "model.pt").exists():
            raise CheckpointError(
                f"{checkpoint} was written by the plain PyTorch engine (one process), and this run uses DeepSpeed. "
                f"Resume it with one process and parallel.engine=torch (parallel.zero_stage=0), or use a new "
                f"run.dir.")
        if not (checkpoint / f"{part}.pt").exists():
            raise CheckpointError(
                f"Checkpoint {checkpoint} has no {part}.pt: it was written by a run with fewer ranks. Resume with "
                f"the layout that wrote it, or use a new run.dir.")
        try:
            with safe_checkpoint_loading():  # DeepSpeed's own torch.load calls: no code from any file runs
                load_path, _ = self.engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as exc:  # a refused pickle, a truncated or foreign file
            reason = " ".join(str(exc).split())[:400]
            raise CheckpointError(
                f"DeepSpeed could not load the checkpoint in {checkpoint} ({type(exc).__name__}: {reason}). Its "
                f"files are damaged, were not written by bigtrain, or hold objects that are not plain data (which "
                f"are refused). Point {checkpoint.parent / 'latest'} at an older step, or use a new run.dir.") from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {checkpoint}.")
        trainer = ckpt.load_part(checkpoint, part)
        ckpt.set_rng_state(trainer["rng"])
        return trainer["state"]

    def load_layout_free(self, checkpoint: Path) -> dict[str, Any]:
        return restore_layout_free(self.state(), checkpoint)

    def init_weights(self, reader: Any) -> None:
        self.state().restore(reader, 0.0)  # step 0: weights only, the optimizer state stays fresh

    # ---- memory --------------------------------------------------------------------------------------
    def measure(self) -> ModelStateBytes:
        return ModelStateBytes(params=measure_params(self.model), grads=self.last_grad_bytes or 0,
                               optimizer=measure_optimizer(self.optimizer))

    def memory_report(self, run_dir: Path | None = None) -> str | None:
        """Gathers every rank's measured bytes (collective); the text on rank 0, None elsewhere. Rank 0 also
        writes the numbers to run_dir/memory.json."""
        mine = self.measure()
        self.measure_grads = False
        p, t = self.cfg.parallel, self.cfg.train
        master = not self.unwrapped
        formula = zero_formula(self.n_params, p.zero_stage, self.dp_size, t.precision, master_copy=master)
        title = (f"model-state memory per rank in step 1 (gradients: peak over its micro-batches)"
                 f"{tensor_share_note(self.groups.layout.tensor)}\n"
                 f"ZeRO-{p.zero_stage}, {self.dp_size} data-parallel ranks, {t.precision}, "
                 f"Ψ = {self.n_params} parameters, K = {12 if master else 8} bytes")
        facts = {"engine": "deepspeed", "zero_stage": p.zero_stage, "dp_size": self.dp_size,
                 "precision": t.precision, "n_params": self.n_params}
        return gathered_report(mine, formula, title, self.group, self.dp_size, self.rank, run_dir, facts)

    def describe(self) -> str:
        return json.dumps(self.ds_config, indent=2, sort_keys=True)
