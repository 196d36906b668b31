"""The pipeline engine: DeepSpeed's `PipelineEngine` (1F1B schedule) behind bigtrain's engine interface.

One optimizer step runs `train_batch` over this data-parallel rank's micro-batches (all stages get the same
iterator; the first reads inputs, the last labels). The loss stays the global batch's mean token loss:
the last stage returns Σ ce · (N_d · m) / N for each micro-batch; DeepSpeed divides by the m
gradient-accumulation steps in backward and averages over the N_d data-parallel ranks, so gradients are
∇(Σ_global ce / N), and its reported loss (mean over micro-batches, averaged over data ranks) is Σ ce / N.

Nothing in a training step waits for the device (see deepspeed_engine.py): the loss DeepSpeed returns, the
gradient norm and the finiteness of the last stage's losses (a device flag over the micro-batches) stay on
the device. The step's non-finite decision needs every micro-batch's loss and must precede the update, so it
is made inside the update, in the inner optimizer's pre-step hook (`_check_in_update`), where every rank of
every stage arrives once per step; with a plain optimizer (ZeRO-0, fp32) bigtrain also measures and clips the
gradient norm there. When DeepSpeed's own optimizer skips a non-finite gradient norm without stepping the inner
one (on every rank alike), the check is made after `train_batch` instead.

Evaluation runs `eval_batch` over the held-out batches; the last stage returns per micro-batch the summed
loss and the accuracy counts, and broadcasts their totals to the other stages of its pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from bigtrain.compat.deepspeed import reset_eval_loss
from bigtrain.config import Config
from bigtrain.distributed import DistEnv
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.deepspeed.engine import DeepSpeedEngine, StepCheck
from bigtrain.engine.result import StepResult
from bigtrain.models.loss import Criterion, correct_predictions, eval_metrics
from bigtrain.optim import set_lr
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.grad_norm import clip_grad_norm
from bigtrain.parallel.pipeline import pipeline_inputs


class PipelineLoss:
    """loss_fn of the last stage: scaled summed cross-entropy in training, summed metrics in evaluation."""

    def __init__(self, criterion: Criterion) -> None:
        self.criterion, self.scale, self.evaluating = criterion, 1.0, False
        # Every training micro-batch's loss on this (last) stage was finite: a 0-dim bool device tensor.
        self.finite = torch.ones((), dtype=torch.bool)

    def start_step(self, scale: float, device: torch.device) -> None:
        """Before a training step: its loss scale (a host number), and no micro-batch seen yet."""
        self.scale = scale
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = self.criterion.loss_sum(logits, labels)
        if not self.evaluating:
            self.finite = self.finite & torch.isfinite(loss_sum.detach())  # on the device: nothing is read
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
        self.measured_norm: torch.Tensor | None = None
        # DeepSpeed's pipeline engine steps a plain optimizer here without measuring the norm: measure and clip
        # just before the update (`_check_in_update`).
        self.clip_before_update = self.unwrapped

    def _batches(self, micro_batches: list[dict[str, torch.Tensor]]):
        return iter([(pipeline_inputs(b, self.family), b["labels"]) for b in micro_batches])

    def _check_in_update(self) -> StepCheck:
        """The step's decision, made at the first inner optimizer step of the step (every rank arrives there
        once all its micro-batches are done): the last stages' loss flags and, with a plain optimizer, the
        gradient norm bigtrain measures (and clips by) here."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        if self.clip_before_update:
            self.measured_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip, self.groups, self.device)
            bad = ~torch.isfinite(self.measured_norm)
        self.check = self.world_check(self.loss_fn.finite, bad)
        return self.check

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool,
                   counts: tuple[int, int] | None = None) -> StepResult:
        set_lr(self.optimizer, lr)
        self.check, self.measured_norm = None, None
        n_targets, n_tokens = self.global_counts(micro_batches, counts)
        self.loss_fn.start_step(self.dp_size * len(micro_batches) / n_targets, self.device)
        loss = self.engine.train_batch(self._batches(micro_batches)).detach().reshape(())
        if self.check is None:  # DeepSpeed skipped the update without stepping the inner optimizer (all ranks)
            self.check = self.world_check(self.loss_fn.finite, torch.zeros((), dtype=torch.bool, device=self.device))
        return self.step_result(loss, self.measured_norm, n_tokens)

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
