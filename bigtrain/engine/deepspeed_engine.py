"""The DeepSpeed engine: data parallelism and ZeRO 0-3 over a process group (gloo on CPU, nccl on GPU).

Loss scaling keeps the logged loss and the gradient those of the whole global batch: each rank counts its
target tokens, one all-reduce gives N (global), and each micro-batch backpropagates Σ ce / N · N_d with
DeepSpeed's division by gradient-accumulation steps turned off; DeepSpeed's data-parallel averaging then
divides by N_d, so every rank's gradient is ∇(Σ_global ce / N) — the single-device gradient.

The process groups come from one `ParallelGroups` (also DeepSpeed's `mpu`): data parallelism and ZeRO act
over the data group; under tensor parallelism each rank of a tensor group holds one shard of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigtrain.compat.deepspeed import has_zero_partitions, inner_optimizer, safe_checkpoint_loading
from bigtrain.components import checkpoint as ckpt
from bigtrain.components.loss import count_input_tokens, count_targets, model_inputs
from bigtrain.components.step_result import StepResult
from bigtrain.config import Config
from bigtrain.distributed import DistEnv
from bigtrain.engine.ds_config import derive_deepspeed_config
from bigtrain.engine.layout_free_io import restore_layout_free, write_layout_free
from bigtrain.engine.layout_free_state import StateAdapter
from bigtrain.engine.memory import (
    ModelStateBytes,
    format_report,
    measure_grads,
    measure_optimizer,
    measure_params,
    zero_formula,
)
from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.errors import CheckpointError, ConfigError
from bigtrain.models import TransformerLM, count_parameters
from bigtrain.optim import build_optimizer, set_lr
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.grad_norm import clip_grad_norm, global_grad_norm, piece_grad_norms
from bigtrain.parallel.groups import ParallelGroups


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
        # A non-finite step never changes the weights or the optimizer state: just before the (inner) optimizer
        # updates, `_before_update` drops every gradient when the step was found non-finite, so the update is a
        # no-op while DeepSpeed's own bookkeeping (accumulation boundaries, counters) goes on as usual.
        self.drop_update, self.dropped = False, False
        self.clip_before_update = False  # the pipeline engine clips (and measures) here when DeepSpeed does not
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_update(opt))

    def _before_update(self, optimizer: torch.optim.Optimizer) -> None:
        if self.clip_before_update:
            self.measured_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip, self.groups)
            self.drop_update |= not math.isfinite(self.measured_norm)
        if self.drop_update:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimizers (and bigtrain's LAMB) leave parameters without a gradient alone
            self.dropped = True

    def first_nonfinite_rank(self, locally_finite: bool) -> int | None:
        """The lowest rank whose own loss was not finite (one all-reduce over all ranks, so every rank decides
        the same), or None."""
        flag = torch.tensor([self.env.world_size if locally_finite else self.rank], dtype=torch.int64,
                            device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        first = int(flag.item())
        return None if first == self.env.world_size else first

    # ---- collectives ---------------------------------------------------------------------------------
    def all_reduce_sum(self, *values: float) -> list[float]:
        """Σ over the data-parallel ranks of a few numbers, in one collective."""
        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    # ---- one step ------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool,
                   counts: tuple[int, int] | None = None) -> StepResult:
        set_lr(self.optimizer, lr)
        local = counts if counts is not None else (sum(count_targets(b) for b in micro_batches),
                                                   sum(count_input_tokens(b) for b in micro_batches))
        n_targets, n_tokens = self.all_reduce_sum(*local)  # counted on the host: one small all-reduce
        total = torch.zeros((), dtype=torch.float32, device=self.engine.device)
        grad_norm, layer_grad_norms = math.nan, None
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            logits = self.engine(**model_inputs(batch))
            loss = self.criterion.loss_sum(logits, batch["labels"]) / n_targets
            self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
            total += loss.detach()
            if self.measure_grads:  # peak gradient bytes over the step (ZeRO-1 frees full gradients at the end)
                self.last_grad_bytes = max(self.last_grad_bytes or 0, measure_grads(self.model, self.optimizer))
            if i == last:
                (loss_value,) = self.all_reduce_sum(float(total))
                first_bad = self.first_nonfinite_rank(math.isfinite(float(total)))
                self.drop_update = first_bad is not None or not math.isfinite(loss_value)
                if self.unwrapped:  # gradients are complete and averaged here (ZeRO-0 all-reduces in backward)
                    grad_norm = global_grad_norm(self.model.parameters(), self.groups)
                    self.drop_update |= not math.isfinite(grad_norm)
                    if layer_norms:
                        layer_grad_norms = piece_grad_norms(self.model, self.groups)
            self.engine.step()
        dropped, self.drop_update, self.dropped = self.dropped, False, False
        if not self.unwrapped:
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else math.nan
        skipped = dropped or not self.engine.was_step_applied()
        return StepResult(loss=loss_value, grad_norm=grad_norm, skipped=skipped,
                          finite=math.isfinite(loss_value) and math.isfinite(grad_norm),
                          layer_grad_norms=layer_grad_norms, tokens=round(n_tokens), nonfinite_rank=first_bad)

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
        tmp = directory / (ckpt.step_dir_name(step) + ".tmp")
        if self.rank == 0:
            ckpt.begin_checkpoint(directory, step)
        dist.barrier()  # every rank of the world: all files are written
        try:
            with ckpt.writing(tmp / "(DeepSpeed's files)"):
                self.engine.save_checkpoint(str(directory), tag=tmp.name, client_state={}, save_latest=False)
            ckpt.write_part(tmp, f"trainer_rank{self.rank:05d}",
                            {"state": trainer_state, "rng": ckpt.rng_state(), "world_size": self.env.world_size})
            if layout_free is not None:
                with ckpt.writing(tmp / "layout_free"):
                    write_layout_free(tmp, self.state(), self.rank, self.env.world_size, layout_free,
                                      barrier=dist.barrier)
        except CheckpointError:
            shutil.rmtree(tmp, ignore_errors=True)  # the other ranks stop at their next collective
            raise
        dist.barrier()  # every rank of the world: all files are written
        final = directory / ckpt.step_dir_name(step)
        if self.rank == 0:
            ckpt.commit_checkpoint(tmp, config_yaml, keep)
        dist.barrier()  # every rank of the world: all files are written
        return final

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
        gathered: list[ModelStateBytes | None] = [None] * self.dp_size
        dist.all_gather_object(gathered, mine, group=self.group)
        if self.rank != 0:
            return None
        p, t = self.cfg.parallel, self.cfg.train
        master = not self.unwrapped
        formula = zero_formula(self.n_params, p.zero_stage, self.dp_size, t.precision, master_copy=master)
        if run_dir is not None:
            (run_dir / "memory.json").write_text(json.dumps({
                "zero_stage": p.zero_stage, "dp_size": self.dp_size, "precision": t.precision,
                "n_params": self.n_params, "formula": dataclasses.asdict(formula),
                "ranks": [dataclasses.asdict(m) for m in gathered]}, indent=1) + "\n")
        shard = (f", tensor-parallel shard {self.groups.layout.tensor}-way (Ψ = this rank's share)"
                 if self.groups.layout.tensor > 1 else "")
        title = (f"model-state memory per rank in step 1 (gradients: peak over its micro-batches){shard}\n"
                 f"ZeRO-{p.zero_stage}, {self.dp_size} data-parallel ranks, {t.precision}, "
                 f"Ψ = {self.n_params} parameters, K = {12 if master else 8} bytes")
        return format_report(gathered, formula, title)

    def describe(self) -> str:
        return json.dumps(self.ds_config, indent=2, sort_keys=True)
