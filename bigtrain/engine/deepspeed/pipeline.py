"""The pipeline engine: DeepSpeed's `PipelineEngine` (1F1B schedule) running the step skeleton's schedule.

    wrap        DeepSpeed's pipeline engine around this rank's stage (`wrap.py`, composed as the data-parallel
                engine composes it); the stage brings its own grid of process groups
    schedule    one optimizer step is `train_batch` over this data-parallel rank's micro-batches (all stages get
                the same iterator; the first reads inputs, the last labels); it runs forward, backward and the
                update itself, so this engine overrides the skeleton's `run_schedule`
    backward    the last stage returns Σ ce · (N_d · m) / N for each micro-batch; DeepSpeed divides by the m
                gradient-accumulation steps in backward and averages over the N_d data-parallel ranks, so
                gradients are ∇(Σ_global ce / N), and its reported loss (mean over micro-batches, averaged over
                data ranks) is Σ ce / N
    optimizer   as in the data-parallel engine; with a plain optimizer (ZeRO-0, fp32) bigtrain measures and clips
                the norm just before the update

Mixture of experts (`model.moe`): only the last stage forms a loss, so each MoE layer carries its own router loss
R into the backward pass (`router_loss_scale` = 1/m, `bigtrain.models.moe.RouterLossInBackward`): after the data
ranks' average, the gradients are ∇(Σ_global ce / N + Σ_micro-batches R / (m·N_d)), the step skeleton's. The
reported loss stays the cross-entropy, as on one device. A forward hook on the stage takes its layers' router
numbers after each training micro-batch; the step's table (`router_report`) holds a row for every MoE layer of
the model, zeros for those of other stages, and is summed over the data group and then the pipeline group, so
every rank reports every layer. Under expert parallelism (`parallel.expert`) DeepSpeed's gradient all-reduce is
off and bigtrain reduces in the update's pre-step hook, before measuring the norm (routed experts over the
expert-data group, the rest over the data group, both divided by N_d: `bigtrain.parallel.expert`), and a checkpoint
keeps the state in its layout-free form alone (`native_state` False), as the data-parallel engine does.

The step's non-finite decision needs every micro-batch's loss and must precede the update, so it is made inside
the update, in the inner optimizer's pre-step hook (`_decide_in_update`), where every rank of every stage arrives
once per step. When DeepSpeed's own optimizer skips a non-finite gradient norm without stepping the inner one
(on every rank alike), the decision is made after `train_batch` instead.

Under context parallelism (causal and masked families) each rank feeds its share of every sequence
(`pipeline_inputs`, with the document ids and padding whole, from which every stage rebuilds the tokens of its
micro-batch), its DeepSpeed data-parallel group is the gradient group (data × context, `build_pipeline_module`),
and the loss scale is Σ ce · (N_d · C · m) / N, so that DeepSpeed's average over the D·C ranks gives the same
gradients and reported loss.

Evaluation runs `eval_batch` over the held-out batches; the last stage returns per micro-batch the summed
loss and, per row, the hits and targets, sums them over its context group (a sequence is correct when every
rank's share is), and broadcasts the totals to the other stages of its pipeline. The causal family's
stages exchange activations of one fixed shape (DeepSpeed's `dynamic_shape` is off), the training micro-batch's, so
a shorter last held-out micro-batch is filled up to train.micro_batch_size with copies of its rows whose labels are
all ignored: they add no loss, no target and no sequence to the sums.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bigtrain.compat.deepspeed import reset_eval_loss
from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.deepspeed.wrap import DeepSpeedWrap, OnDeepSpeed
from bigtrain.engine.evaluate import EvalSums
from bigtrain.models.loss import IGNORE_INDEX, Criterion
from bigtrain.models.moe import moe_layer_names, moe_layers, take_router_stats
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.expert import reduce_gradients
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
        valid = labels != IGNORE_INDEX
        hits = ((self.criterion.predictions(logits) == labels) & valid).sum(-1)
        return torch.cat([loss_sum.detach().double().reshape(1), hits.double(), valid.sum(-1).double()])


class PipelineEngine(OnDeepSpeed):
    def __init__(self, cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups,
                 device: torch.device) -> None:
        if parallel.stage is None:
            raise ValueError("the pipeline engine runs a pipeline stage: parallelize with parallel.pipeline > 1")
        self.layout, self.groups, self.criterion = layout, groups, parallel.criterion
        self.dp_rank, self.dp_size = groups.get_data_parallel_rank(), layout.data
        self.family, self.context = parallel.model.family, parallel.context
        self.loss_fn = PipelineLoss(parallel.criterion)
        parallel.stage.loss_fn = self.loss_fn  # read by DeepSpeed on the last stage of every micro-batch
        self.ds = DeepSpeedWrap(cfg, layout, parallel, groups, found_inf=self._decide_in_update, mpu=False)
        self.model, self.optimizer, self.device = self.ds.engine.module, self.ds.optimizer, self.ds.engine.device
        self.grad_clip, self.micro_batch_size = cfg.optim.grad_clip, cfg.train.micro_batch_size
        self.stage = groups.get_pipeline_model_parallel_rank()
        self.last_stage = layout.pipeline - 1
        c = groups.coords
        self.last_stage_rank = layout.rank_of(self.last_stage, c.data, c.tensor, c.context)
        self.expert = layout.expert > 1  # bigtrain reduces the gradients (module docstring)
        self.native_state = not self.expert
        self._find_router_layers(parallel, cfg.model.moe.experts)

    def _find_router_layers(self, parallel: ParallelModel, experts: int) -> None:
        """Every MoE layer of the model by name (`router_names`), this stage's layers and their rows among them."""
        self.router_experts = experts
        self.router_names = tuple(moe_layer_names(parallel.model))
        row = {id(m): i for i, m in enumerate(moe_layers(parallel.model))}
        self.router_layers = moe_layers(self.ds.engine.module)
        self.router_stage_rows = [row[id(m)] for m in self.router_layers]
        if self.router_layers:
            self.ds.engine.module.register_forward_hook(self._take_router_stats)

    def _take_router_stats(self, module, args, output) -> None:
        """After each forward of the stage: its MoE layers' numbers, kept for the step in training."""
        stats = take_router_stats(self.router_layers)
        if stats and self.router_steps is not None and not self.loss_fn.evaluating:
            self.router_steps.append(stats)

    def _batches(self, micro_batches: list[dict[str, torch.Tensor]]):
        """(first stage's inputs, last stage's labels) per micro-batch: under context parallelism this rank's
        share of the ids and labels."""
        shard = (lambda t: t) if self.context is None else self.context.shard
        return iter([(pipeline_inputs(b, self.family, self.context), shard(b["labels"])) for b in micro_batches])

    # ---- the step ------------------------------------------------------------------------------------
    def run_schedule(self, micro_batches: list[dict[str, torch.Tensor]], n_targets: int) -> torch.Tensor:
        self.loss_fn.start_step(self.backward_scale * len(micro_batches) / n_targets, self.device)
        for layer in self.router_layers:  # DeepSpeed divides the last stage's loss by m: so is each router loss
            layer.router_loss_scale = 1.0 / len(micro_batches)
        try:
            loss = self.ds.engine.train_batch(self._batches(micro_batches)).detach().reshape(())
        finally:
            if self.context is not None:
                self.context.clear()
        if self.check is None:  # DeepSpeed skipped the update without stepping the inner optimizer (all ranks)
            self.decide(self.loss_fn.finite, None, measure=False)
        return loss

    def _decide_in_update(self) -> torch.Tensor:
        """The step's decision, made at the first inner optimizer step of the step (every rank arrives there once
        all its micro-batches are done): the last stages' loss flags and the norm measured here."""
        if self.check is None:
            if self.expert:
                reduce_gradients(self.ds.params, self.groups, self.dp_size)
            self.decide(self.loss_fn.finite, None)
        return self.check.found_inf

    def measure_norm(self) -> torch.Tensor | None:
        if not self.ds.unwrapped:
            return None
        return clip_grad_norm(self.ds.params, self.grad_clip, self.groups, self.device)

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_sums(self, batches: list[dict[str, torch.Tensor]]) -> EvalSums:
        """Held-out sums through the pipeline (every rank returns the same numbers): the last stage returns per
        micro-batch the summed loss and the accuracy counts, and broadcasts their totals to the other stages of its
        pipeline."""
        batches = [self._full_size(b) for b in batches]
        self.loss_fn.evaluating = True
        reset_eval_loss(self.ds.engine)
        try:
            outputs = self.ds.engine.eval_batch(self._batches(batches), compute_loss=True, reduce_output=None,
                                                bcast_loss=False, num_micro_batches=len(batches))
        finally:
            self.loss_fn.evaluating = False
            reset_eval_loss(self.ds.engine)
            self.ds.engine.module.train()
            if self.context is not None:
                self.context.clear()
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)
        if self.stage == self.last_stage:
            totals = self._totals(list(outputs))
        dist.broadcast(totals, src=self.last_stage_rank, group=self.groups.group("pipeline"))
        loss_sum, *counts = totals.tolist()
        return EvalSums(loss_sum, *(int(c) for c in counts))

    def _totals(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """[loss, correct, targets, correct sequences, sequences] from the last stage's per micro-batch
        [loss, hits per row, targets per row], summed over the context group first (per row: a sequence is
        correct when the hits of every rank's share add up to its targets)."""
        per_batch = torch.stack(outputs)  # [m, 1 + 2B]
        if self.context is not None:
            per_batch = self.context.sum(per_batch)
        rows = (per_batch.shape[1] - 1) // 2
        loss, hits, valid = per_batch[:, 0], per_batch[:, 1:1 + rows], per_batch[:, 1 + rows:]
        return torch.stack([loss.sum(), hits.sum(), valid.sum(), ((hits == valid) & (valid > 0)).sum().double(),
                            (valid > 0).sum().double()])

    def _full_size(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` filled up to train.micro_batch_size rows with copies of its rows whose labels are all ignored
        (module docstring); a full batch as it is."""
        rows = batch["labels"].shape[0]
        if rows >= self.micro_batch_size:
            return batch
        fill = torch.arange(self.micro_batch_size - rows, device=batch["labels"].device) % rows
        full = {k: torch.cat([v, v[fill]]) for k, v in batch.items()}
        full["labels"][rows:] = IGNORE_INDEX
        return full
