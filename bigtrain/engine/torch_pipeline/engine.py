"""PyTorch's pipeline schedules as an engine (parallel.engine=torch, parallel.pipeline > 1): this rank's stages
(`parallelize` builds them, tensor-parallel where parallel.tensor > 1) run by a torch.distributed.pipelining schedule
(`parallel.pipeline_schedule`, `parallel.virtual_stages`; `bigtrain.parallel.schedules.PipelineRunner`).

    schedule    one optimizer step is one `schedule.step` over this data-parallel rank's m micro-batches (stacked
                into one batch, `pipeline_batches`); it runs the forwards and backwards in the schedule's order,
                so this engine overrides the skeleton's `run_schedule`
    loss        each micro-batch's loss is Σ ce / N with N the target count of the whole global batch (every
                data rank's), so the micro-batch losses of all data ranks add up to L and gradients to ∇L
    tied        the embedding's gradients are summed over the pipeline ranks that use it (input embedding, a
                seq2seq decoder's, a tied head); the copies on later ranks are marked and counted once
    data        zero_stage 0: the D data-parallel replicas sum their gradients (one all-reduce over the data
                group: ∇L = Σ_d ∇L_d)
    norm        ‖g‖² summed over the tensor and pipeline groups (replicated parameters and tied copies once);
                bigtrain clips
    optimizer   bigtrain's AdamW, or exact LAMB whose per-parameter norms of tensor shards are summed over the
                tensor group (`ZeroLamb`)
    evaluation  forward only through the same stages (the schedule's `eval`); the last stage sums the loss and
                the accuracy counts, broadcast to the pipeline
    own files   torch_pipeline_rankNNNNN.pt (`files.py`)

A non-finite step is skipped on the device (`found_inf`), as in every engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.config.schedule_checks import micro_batches
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.base import ShardedState
from bigtrain.engine.evaluate import EvalSums
from bigtrain.engine.step import StepEngine, step_unless_found_inf
from bigtrain.engine.torch_pipeline.files import native_part
from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.errors import CheckpointError
from bigtrain.io import SaveFile, load_torch, save_torch
from bigtrain.models.loss import correct_predictions
from bigtrain.optim import param_groups
from bigtrain.optim.build import adamw
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.grad_norm import clip_grad_norm, piece_grad_norms
from bigtrain.parallel.pipeline_batches import stack_micro_batches
from bigtrain.parallel.schedules import PipelineRunner
from bigtrain.parallel.stages import model_parameters


def _optimizer(cfg: Config, layout: Layout, groups: ParallelGroups, stages: nn.Module) -> Any:
    """bigtrain's AdamW, or LAMB whose norms of tensor shards are summed over the tensor group."""
    o = cfg.optim
    by_decay = param_groups(stages, o.weight_decay)
    if o.name == "lamb":
        return ZeroLamb(by_decay, tensor_group=groups.tensor_group if layout.tensor > 1 else None, lr=o.lr,
                        betas=(o.beta1, o.beta2), eps=o.eps, max_trust_ratio=o.lamb_max_trust_ratio)
    return adamw(by_decay, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


class TorchPipelineEngine(StepEngine):
    config_file = "engine_config.json"

    def __init__(self, cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups,
                 device: torch.device) -> None:
        if parallel.stages is None:
            raise ValueError("the torch_pipeline engine runs pipeline stages: parallelize with engine torch_pipeline")
        self.layout, self.groups, self.device = layout, groups, device
        self.model, self.criterion, self.shards = parallel.model, parallel.criterion, parallel.shards
        self.dp_rank, self.dp_size = groups.get_data_parallel_rank(), layout.data
        p = cfg.parallel
        self.m = micro_batches(cfg, layout)
        assert self.m is not None, "check_training refuses batch sizes that do not divide"
        self.runner = PipelineRunner(self.model, p.pipeline_schedule, p.virtual_stages, self.m, None,
                                     group=groups.group("pipeline"), device=device,
                                     documents=cfg.data.document_masking, loss_sum=parallel.criterion.loss_sum,
                                     stages=parallel.stages)
        self.stage_modules = nn.ModuleList(self.runner.modules)
        self.named = model_parameters(self.runner.modules)  # unsplit names, each parameter once
        self.params = list(self.named.values())
        self.optimizer: Any = _optimizer(cfg, layout, groups, self.stage_modules)
        self.grad_clip = cfg.optim.grad_clip

    # ---- the step ------------------------------------------------------------------------------------
    def run_schedule(self, micro_batches: list[dict[str, torch.Tensor]], n_targets: int) -> torch.Tensor:
        if len(micro_batches) != self.m:
            raise ValueError(f"the pipeline schedule runs {self.m} micro-batches per step, got {len(micro_batches)}")
        with self.autocast():
            local = self.runner.step(stack_micro_batches(micro_batches), targets=n_targets)
        self.gradients_done()
        loss = self.sum_over_data(local)
        self.update(self.decide(torch.isfinite(local), loss))
        return loss

    def gradients_done(self) -> None:
        """zero_stage 0 with D > 1: Σ over the data-parallel replicas of every gradient (one flat all-reduce)."""
        if self.dp_size == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.groups.data_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def measure_norm(self) -> torch.Tensor:
        return clip_grad_norm(self.params, self.grad_clip, self.groups, self.device)

    def layer_norms(self) -> dict[str, float]:
        return piece_grad_norms(self.model, self.groups)

    def update(self, found_inf: torch.Tensor) -> None:
        step_unless_found_inf(self.optimizer, found_inf)
        self.optimizer.zero_grad(set_to_none=True)

    # ---- evaluation ----------------------------------------------------------------------------------
    def _metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed loss and accuracy counts of one micro-batch (the last stage's loss function in evaluation)."""
        counts = correct_predictions(self.criterion.predictions(logits), labels)
        return torch.tensor([float(self.criterion.loss_sum(logits, labels)), *counts], dtype=torch.float64,
                            device=logits.device)

    def evaluate_sums(self, batches: list[dict[str, torch.Tensor]]) -> EvalSums:
        """Held-out sums through the pipeline (every rank of every data replica runs all of them)."""
        if not batches:
            return EvalSums()
        with self.autocast():
            totals = self.runner.evaluate(batches, self._metrics, width=5)
        loss_sum, *counts = totals.tolist()
        return EvalSums(loss_sum, *(int(c) for c in counts))

    # ---- state ---------------------------------------------------------------------------------------
    def sharded_state(self) -> ShardedState:
        return ShardedState(self.model, self.shards, self.optimizer, None,
                            tensor_rank=self.groups.get_tensor_model_parallel_rank(), data_rank=self.dp_rank)

    def write_native(self, folder: Path, save: SaveFile = save_torch) -> None:
        """Every rank its stages' parameters (unsplit names) and its optimizer state."""
        save(folder / native_part(self.groups.rank), {
            "model": {n: p.detach() for n, p in self.named.items()}, "optimizer": self.optimizer.state_dict()})

    def read_native(self, checkpoint: Path) -> None:
        path = checkpoint / native_part(self.groups.rank)
        own = load_torch(path, self.device)
        model = own["model"]
        wrong = sorted(set(self.named) ^ set(model)) + [n for n in self.named if n in model and
                                                        model[n].shape != self.named[n].shape]
        if wrong:
            raise CheckpointError(f"{path} does not fit this rank's stages (parameters {wrong[:3]} differ): it was "
                                  f"written for another model, stage cut or schedule. Resume with the settings that "
                                  f"wrote it, or use a new run.dir.")
        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(model[name])
        self.optimizer.load_state_dict(own["optimizer"])

    def describe(self) -> str:
        return json.dumps({"engine": "torch_pipeline", "schedule": self.runner.schedule_name,
                           "virtual_stages": self.runner.virtual_stages, "pipeline": self.layout.pipeline,
                           "stages": self.runner.stages.indices, "layer_bounds": self.runner.stages.bounds,
                           "micro_batches": self.m, "data_parallel_size": self.dp_size,
                           "precision": self.layout.precision, "parameters": len(self.named)}, indent=2)
