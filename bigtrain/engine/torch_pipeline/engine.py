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
                group: ∇L = Σ_d ∇L_d). zero_stage 2/3: every stage is sharded by FSDP2 over the data group
                (`sharding.py`; 3: parameters gathered again for backward), the schedule reduce-scatters each
                stage's gradients once per step, after its last micro-batch's backward; each rank keeps its rows
    norm        ‖g‖² summed over the tensor and pipeline groups (replicated parameters and tied copies once), and
                under FSDP2 first over the data group (each rank's rows); bigtrain clips
    optimizer   bigtrain's AdamW, or exact LAMB whose per-parameter norms of tensor shards are summed over the
                tensor group and, under FSDP2, of rows over the data group (`ZeroLamb`); under FSDP2 both update
                this rank's rows (flat views of the sharded parameters' storage)
    evaluation  forward only through the same stages (the schedule's `eval`); the last stage sums the loss and
                the accuracy counts, broadcast to the pipeline
    context     under context parallelism (zero_stage 0) each rank runs its share of every sequence
                (`PipelineRunner`'s `context`), the gradients are summed over data × context (the gradient
                group), and the last stage sums each held-out row's hits and targets over the context group
    own files   torch_pipeline_rankNNNNN.pt (`files.py`); under FSDP2 each rank's rows, flat, and their shapes

A non-finite step is skipped on the device (`found_inf`), as in every engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.compat.deepspeed import Partition
from bigtrain.compat.fsdp2 import local_grad
from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.config.schedule_checks import micro_batches
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.base import ShardedState
from bigtrain.engine.evaluate import EvalSums
from bigtrain.engine.fsdp2.sharding import LocalShard
from bigtrain.engine.memory import ModelStateBytes, gathered_report, measure_optimizer, tensor_bytes, tensor_share_note
from bigtrain.engine.step import StepEngine, step_unless_found_inf
from bigtrain.engine.torch_pipeline.files import native_part
from bigtrain.engine.torch_pipeline.sharding import check_tied_stages, stage_shards
from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.errors import CheckpointError
from bigtrain.io import SaveFile, load_torch, save_torch
from bigtrain.models.loss import IGNORE_INDEX, correct_predictions
from bigtrain.optim import param_groups
from bigtrain.optim.build import adamw
from bigtrain.parallel import ParallelModel
from bigtrain.parallel.grad_norm import clip_grad_norm, clip_sharded, piece_grad_norms, sharded_piece_norms
from bigtrain.parallel.pipeline_batches import stack_micro_batches
from bigtrain.parallel.schedules import PipelineRunner
from bigtrain.parallel.stages import model_parameters
from bigtrain.planning.zero import zero_formula


def _optimizer(cfg: Config, layout: Layout, groups: ParallelGroups, by_decay: list[dict[str, Any]]) -> Any:
    """bigtrain's AdamW, or LAMB whose norms of tensor shards are summed over the tensor group (and of FSDP2 rows
    over the data group)."""
    o = cfg.optim
    if o.name == "lamb":
        return ZeroLamb(by_decay, tensor_group=groups.tensor_group if layout.tensor > 1 else None,
                        shard_group=groups.data_group if layout.zero_stage >= 2 and layout.data > 1 else None,
                        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, max_trust_ratio=o.lamb_max_trust_ratio)
    return adamw(by_decay, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


class TorchPipelineEngine(StepEngine):
    config_file = "engine_config.json"

    def __init__(self, cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups,
                 device: torch.device) -> None:
        if parallel.stages is None:
            raise ValueError("the torch_pipeline engine runs pipeline stages: parallelize with engine torch_pipeline")
        self.layout, self.groups, self.device = layout, groups, device
        self.model, self.criterion, self.tp_shards = parallel.model, parallel.criterion, parallel.shards
        self.dp_rank, self.dp_size = groups.get_data_parallel_rank(), layout.data
        self.context = parallel.context
        p = cfg.parallel
        self.m = micro_batches(cfg, layout)
        assert self.m is not None, "check_training refuses batch sizes that do not divide"
        self.runner = PipelineRunner(self.model, p.pipeline_schedule, p.virtual_stages, self.m, None,
                                     group=groups.group("pipeline"), device=device,
                                     documents=cfg.data.document_masking, loss_sum=parallel.criterion.loss_sum,
                                     stages=parallel.stages, context=parallel.context)
        self.stage_modules = nn.ModuleList(self.runner.modules)
        self.grad_clip = cfg.optim.grad_clip
        self.sharded = layout.zero_stage >= 2  # FSDP2 over the data group, per stage
        decay_groups = param_groups(self.stage_modules, cfg.optim.weight_decay)  # decay goes by ndim: unsharded
        self.shards: list[LocalShard] = []
        self.last_grad_bytes = 0
        if self.sharded:
            check_tied_stages(parallel.stages)
            names = {id(p): n for n, p in model_parameters(self.runner.modules).items()}
            decay_names = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in decay_groups]
            self.shards = stage_shards(self.runner.modules, groups.data_group, device.type, layout.zero_stage,
                                       layout.precision == "bf16", set(parallel.shards), self.dp_rank, self.dp_size)
            self.runner.loss_fn.backward_scale = self.dp_size  # FSDP2 averages over the data group
            self.runner.data_shard = (self.dp_rank, self.dp_size)
            by_name = {s.name: s for s in self.shards}
            decay_groups = [{**g, "params": [by_name[n].values for n in g["params"]]} for g in decay_names]
            self.of_values = {id(s.values): s for s in self.shards}
        self.named = ({s.name: s.values for s in self.shards} if self.sharded
                      else model_parameters(self.runner.modules))  # unsplit names, each parameter once
        self.params = list(self.named.values())
        self.optimizer: Any = _optimizer(cfg, layout, groups, decay_groups)

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
        """zero_stage 0 with D·C > 1: Σ over the gradient group (the data-parallel replicas × the context ranks)
        of every gradient (one flat all-reduce); under FSDP2 the schedule has reduce-scattered them: the optimizer
        reads this rank's rows."""
        if self.sharded:
            self.last_grad_bytes = tensor_bytes(local_grad(s.param) for s in self.shards)
            for s in self.shards:
                s.link_grad()
            return
        if self.dp_size * self.layout.context == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.groups.gradient_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def measure_norm(self) -> torch.Tensor:
        if not self.sharded:
            return clip_grad_norm(self.params, self.grad_clip, self.groups, self.device)
        return clip_sharded(self.params, self.grad_clip, self.groups, self.device)

    def layer_norms(self) -> dict[str, float]:
        if not self.sharded:
            return piece_grad_norms(self.model, self.groups)
        return sharded_piece_norms(self.model, self.params, self.groups, self.device)

    def update(self, found_inf: torch.Tensor) -> None:
        step_unless_found_inf(self.optimizer, found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        if self.sharded:
            self.stage_modules.zero_grad(set_to_none=True)

    # ---- evaluation ----------------------------------------------------------------------------------
    def _metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed loss and accuracy counts of one micro-batch (the last stage's loss function in evaluation); under
        context parallelism the loss and each row's hits and targets summed over the context group first."""
        if self.context is None:
            counts = correct_predictions(self.criterion.predictions(logits), labels)
            return torch.tensor([float(self.criterion.loss_sum(logits, labels)), *counts], dtype=torch.float64,
                                device=logits.device)
        valid = labels != IGNORE_INDEX
        hits = ((self.criterion.predictions(logits) == labels) & valid).sum(-1)
        sums = self.context.sum(torch.cat([self.criterion.loss_sum(logits, labels).double().reshape(1),
                                           hits.double(), valid.sum(-1).double()]))
        rows = hits.numel()
        hits, valid_rows = sums[1:1 + rows], sums[1 + rows:]
        return torch.stack([sums[0], hits.sum(), valid_rows.sum(), ((hits == valid_rows) & (valid_rows > 0)).sum(),
                            (valid_rows > 0).sum()]).double()

    def evaluate_sums(self, batches: list[dict[str, torch.Tensor]]) -> EvalSums:
        """Held-out sums through the pipeline (every rank of every data replica runs all of them)."""
        if not batches:
            return EvalSums()
        with self.autocast():
            totals = self.runner.evaluate(batches, self._metrics, width=5)
        loss_sum, *counts = totals.tolist()
        return EvalSums(loss_sum, *(int(c) for c in counts))

    # ---- state ---------------------------------------------------------------------------------------
    def _partition(self, values: torch.Tensor) -> Partition:
        return Partition(flat=values, flat_start=0, param_start=self.of_values[id(values)].start,
                         numel=values.numel())

    def sharded_state(self) -> ShardedState:
        tensor_rank = self.groups.get_tensor_model_parallel_rank()
        if not self.sharded:
            return ShardedState(self.model, self.tp_shards, self.optimizer, None, tensor_rank=tensor_rank,
                                data_rank=self.dp_rank)
        return ShardedState(self.model, self.tp_shards, self.optimizer, None, tensor_rank=tensor_rank,
                            data_rank=self.dp_rank, partition=self._partition, params=list(self.named.items()),
                            shape_of=lambda values: self.of_values[id(values)].shape)

    def write_native(self, folder: Path, save: SaveFile = save_torch) -> None:
        """Every rank its stages' parameters (unsplit names; under FSDP2 its rows, flat, and the shapes they were
        cut from) and its optimizer state."""
        own: dict[str, Any] = {"model": {n: p.detach() for n, p in self.named.items()},
                               "optimizer": self.optimizer.state_dict()}
        if self.sharded:
            own["shapes"] = {s.name: list(s.shape) for s in self.shards}
        save(folder / native_part(self.groups.rank), own)

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

    # ---- reports -------------------------------------------------------------------------------------
    def memory_report(self, run_dir: Path | None = None) -> str | None:
        """Under FSDP2: every rank's measured bytes of its stages, next to ZeRO-3's (4Ψ_stage + 4Ψ_stage +
        8Ψ_stage) / D with Ψ_stage the parameters of rank 0's stages (each rank's Ψ_stage in `stage_params`)."""
        if not self.sharded:
            return None
        world = dist.get_world_size()
        psi: list[int | None] = [None] * world
        dist.all_gather_object(psi, sum(s.shape.numel() for s in self.shards), group=self.groups.host_world)
        mine = ModelStateBytes(params=tensor_bytes(self.params), grads=self.last_grad_bytes,
                               optimizer=measure_optimizer(self.optimizer))
        formula = zero_formula(int(psi[0] or 0), 3, self.dp_size, "fp32", master_copy=False)
        title = (f"model-state memory per rank (global rank order) in step 1 (gradients: this rank's rows after the "
                 f"reduce-scatter){tensor_share_note(self.layout.tensor)}\n"
                 f"PyTorch pipeline stages sharded by FSDP2 (ZeRO-{self.layout.zero_stage}), pipeline "
                 f"{self.layout.pipeline} x data {self.dp_size}, fp32 master weights; formula: rank 0's stages, "
                 f"Ψ_stage = {psi[0]} parameters, K = 8 bytes")
        facts = {"engine": "torch_pipeline", "zero_stage": self.layout.zero_stage, "dp_size": self.dp_size,
                 "pipeline": self.layout.pipeline, "stage_params": psi}
        return gathered_report(mine, formula, title, self.groups.host_world, world, self.groups.rank, run_dir, facts)

    def describe(self) -> str:
        return json.dumps({"engine": "torch_pipeline", "schedule": self.runner.schedule_name,
                           "virtual_stages": self.runner.virtual_stages, "pipeline": self.layout.pipeline,
                           "stages": self.runner.stages.indices, "layer_bounds": self.runner.stages.bounds,
                           "micro_batches": self.m, "data_parallel_size": self.dp_size,
                           "zero_stage": self.layout.zero_stage,
                           "reshard_after_forward": self.layout.zero_stage == 3 if self.sharded else None,
                           "precision": self.layout.precision, "parameters": len(self.named)}, indent=2)
