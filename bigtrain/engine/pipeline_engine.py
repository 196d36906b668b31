"""The pipeline engine: DeepSpeed's `PipelineEngine` (1F1B schedule) behind bigtrain's engine interface.

One optimizer step runs `train_batch` over this data-parallel rank's micro-batches (all stages get the same
iterator; the first reads inputs, the last labels). The loss stays the global batch's mean token loss:
the last stage returns Σ ce · (N_d · m) / N for each micro-batch; DeepSpeed divides by the m
gradient-accumulation steps in backward and averages over the N_d data-parallel ranks, so gradients are
∇(Σ_global ce / N), and its reported loss (mean over micro-batches, averaged over data ranks) is Σ ce / N.

Evaluation runs `eval_batch` over the held-out batches; the last stage returns per micro-batch the summed
loss and the accuracy counts, and broadcasts their totals to the other stages of its pipeline.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from bigtrain.compat.deepspeed import reset_eval_loss
from bigtrain.components.loss import Criterion, correct_predictions, count_input_tokens, count_targets, eval_metrics
from bigtrain.components.step_result import StepResult
from bigtrain.config import Config
from bigtrain.distributed import DistEnv
from bigtrain.engine.deepspeed_engine import DeepSpeedEngine
from bigtrain.optim import set_lr
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.groups import ParallelGroups
from bigtrain.parallel.pipeline import pipeline_inputs


class PipelineLoss:
    """loss_fn of the last stage: scaled summed cross-entropy in training, summed metrics in evaluation."""

    def __init__(self, criterion: Criterion) -> None:
        self.criterion, self.scale, self.evaluating = criterion, 1.0, False
        self.finite = True  # every training micro-batch's loss on this (last) stage was finite

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = self.criterion.loss_sum(logits, labels)
        if not self.evaluating:
            self.finite = self.finite and bool(torch.isfinite(loss_sum))
            return loss_sum * self.scale
        counts = correct_predictions(self.criterion.predictions(logits), labels)
        return torch.tensor([float(loss_sum), *counts], dtype=torch.float64, device=logits.device)


class PipelineEngine(DeepSpeedEngine):
    uses_mpu = False

    def __init__(self, cfg: Config, parallel: ParallelModel, env: DistEnv, groups: ParallelGroups) -> None:
        if parallel.stage is None:
            raise ValueError("the pipeline engine runs a pipeline stage: parallelize with parallel.pipeline > 1")
        self.family = parallel.model.family
        self.loss_fn = PipelineLoss(parallel.criterion)
        parallel.stage.loss_fn = self.loss_fn  # read by DeepSpeed on the last stage of every micro-batch
        super().__init__(cfg, parallel, env, groups)
        self.measure_grads = False
        self.stage = groups.get_pipeline_model_parallel_rank()
        self.last_stage = groups.layout.pipeline - 1
        c = groups.coords
        self.last_stage_rank = groups.layout.rank_of(self.last_stage, c.data, c.tensor)
        self.measured_norm: float | None = None
        # DeepSpeed's pipeline engine steps a plain optimizer here without measuring the norm: measure and clip
        # just before the update (`_before_update`), which also drops a non-finite update.
        self.clip_before_update = self.unwrapped

    def _batches(self, micro_batches: list[dict[str, torch.Tensor]]):
        return iter([(pipeline_inputs(b, self.family), b["labels"]) for b in micro_batches])

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool,
                   counts: tuple[int, int] | None = None) -> StepResult:
        set_lr(self.optimizer, lr)
        local = counts if counts is not None else (sum(count_targets(b) for b in micro_batches),
                                                   sum(count_input_tokens(b) for b in micro_batches))
        n_targets, n_tokens = self.all_reduce_sum(*local)  # counted on the host: one small all-reduce
        self.loss_fn.scale = self.dp_size * len(micro_batches) / n_targets
        self.loss_fn.finite = True
        loss_value = float(self.engine.train_batch(self._batches(micro_batches)))
        dropped, self.drop_update, self.dropped = self.dropped, False, False
        first_bad = self.first_nonfinite_rank(self.loss_fn.finite)
        norm = self.measured_norm if self.unwrapped else self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        return StepResult(loss=loss_value, grad_norm=grad_norm, skipped=dropped or not self.engine.was_step_applied(),
                          finite=math.isfinite(loss_value) and math.isfinite(grad_norm), tokens=round(n_tokens),
                          nonfinite_rank=first_bad)

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Held-out metrics through the pipeline (every rank returns the same numbers)."""
        self.loss_fn.evaluating = True
        reset_eval_loss(self.engine)
        try:
            outputs = self.engine.eval_batch(self._batches(batches), compute_loss=True, reduce_output=None,
                                             bcast_loss=False, num_micro_batches=len(batches))
        finally:
            self.loss_fn.evaluating = False
            reset_eval_loss(self.engine)
            self.engine.module.train()
        totals = torch.zeros(5, dtype=torch.float64, device=self.engine.device)
        if self.stage == self.last_stage:
            totals = torch.stack(list(outputs)).sum(0)
        dist.broadcast(totals, src=self.last_stage_rank, group=self.groups.group("pipeline"))
        return eval_metrics(*totals.tolist())

    def memory_report(self, run_dir: Any = None) -> str | None:
        return None  # per-stage model-state memory is not reported yet
