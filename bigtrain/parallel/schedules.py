"""One training step of a bigtrain model through a `torch.distributed.pipelining` schedule
(`parallel.pipeline_schedule`, `parallel.virtual_stages`).

    1f1b              Schedule1F1B                      V = 1, loop placement
    gpipe             ScheduleGPipe                     V = 1, loop placement
    interleaved_1f1b  ScheduleInterleaved1F1B           V ≥ 2, loop placement (rank r: r, r + p, …)
    zero_bubble       ScheduleInterleavedZeroBubble     V ≥ 2, loop placement (ZB1P: weight gradients fill the bubble)
    dualpipev         ScheduleDualPipeV                 V = 2, V-shaped placement (rank r: r and 2p - 1 - r)

zero_bubble is torch's interleaved zero-bubble schedule rather than its V-shaped ZBV one: it keeps the loop
placement of interleaved_1f1b (switching between the two moves no layer) and takes any V ≥ 2; the V-shaped
placement is DualPipeV's.

The loss is every engine's: the mean over all target tokens of the global batch,

    L = Σ_micro-batches Σ_targets -log p(label) / N,   N = target tokens (labels ≠ -100) of the whole batch,

so each micro-batch's loss is its token sum divided by the global N (`scale_grads=False`: torch must not divide
again by the micro-batch count), and the micro-batch losses add up to L; their gradients accumulate to ∇L. This
is not the mean of per-micro-batch means unless all micro-batches hold equally many targets (padded families
do not).

Tied embedding: the gradient of a parameter used on several ranks is the sum of its uses' gradients
(`reduce_tied_grads`, the all-reduce DeepSpeed's `TiedLayerSpec` does), so the copies stay equal under any
optimizer that sees the same gradient.

torch's stages infer the shapes of what crosses a boundary from the first micro-batch they run and keep them;
padded families (masked, seq2seq) change length from batch to batch, so the stages and schedule are made per
input shape (`PipelineRunner` keeps the last few). Every rank of the pipeline group passes the same batch (only
the first stage reads the inputs and only the last the labels; all need the shapes).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.models import TransformerLM
from bigtrain.models.loss import IGNORE_INDEX, cross_entropy_sum
from bigtrain.parallel.context.inputs import ContextInputs
from bigtrain.parallel.pipeline import pipeline_inputs
from bigtrain.parallel.pipeline_batches import fill_eval_batches, stack_micro_batches
from bigtrain.parallel.stages import RankStages, build_rank_stages, stage_indices, stage_rank

# parallel.pipeline_schedule -> the torch.distributed.pipelining class
SCHEDULE_CLASSES = {
    "1f1b": "Schedule1F1B",
    "gpipe": "ScheduleGPipe",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
SINGLE_STAGE = ("1f1b", "gpipe")  # one stage per rank (torch's PipelineScheduleSingle)


class GlobalMeanLoss:
    """loss_fn(logits, labels) of one micro-batch = Σ_targets CE / N · s, N = the global batch's target count (set
    by `pipeline_step` before each step), s = `backward_scale`: 1, or D where the data-parallel reduction averages
    over D ranks (FSDP2 stages), so that the averaged gradient is the sum's. `loss_sum`: the summed cross-entropy
    of a micro-batch (a criterion's `loss_sum`; tensor parallelism's vocabulary-parallel one reads logit shards)."""

    def __init__(self, loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum) -> None:
        self.targets, self.loss_sum, self.backward_scale = 1, loss_sum, 1

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss_sum(logits, labels) / self.targets
        return loss * self.backward_scale if self.backward_scale != 1 else loss


def stage_class():
    """torch's `PipelineStage` whose shape inference feeds defined values: a stage that does not hold the first
    stage infers its shapes by running one forward (and backward) on tensors made from the metadata it receives,
    which torch leaves uninitialized (`torch.empty`); bigtrain's int64 inputs are token ids, masks and document
    ids, so garbage there indexes outside the embedding. Here they are ones (a valid id, a real token, one
    document) and floating tensors zeros. Overrides torch's private `_to_tensor` (torch >= 2.12's dynamic
    metadata inference); real tensors pass through unchanged."""
    from torch.distributed.pipelining import PipelineStage

    class DefinedInferenceStage(PipelineStage):
        def _to_tensor(self, arg):
            t = super()._to_tensor(arg)
            if isinstance(arg, torch.Tensor):
                return t
            with torch.no_grad():
                t.fill_(0 if t.is_floating_point() else 1)
            return t

    return DefinedInferenceStage


def make_schedule(name: str, stages: list, n_microbatches: int, loss_fn: Callable):
    """The torch schedule object for `parallel.pipeline_schedule` = `name` over this rank's `PipelineStage`s."""
    from torch.distributed.pipelining import schedules as torch_schedules

    if name not in SCHEDULE_CLASSES:
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {', '.join(SCHEDULE_CLASSES)}")
    cls = getattr(torch_schedules, SCHEDULE_CLASSES[name])
    if name in SINGLE_STAGE:
        if len(stages) != 1:
            raise ValueError(f"{name} runs one stage per rank, this rank holds {len(stages)}")
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: itself, or this rank's part of a DTensor (an FSDP2-sharded parameter or its gradient)."""
    return t.to_local() if hasattr(t, "to_local") else t


def reduce_tied_grads(model: TransformerLM, rank_stages: RankStages, group: dist.ProcessGroup | None,
                      tied_group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                      data_shard: tuple[int, int] | None = None) -> None:
    """Sum the embedding's gradients over the pipeline ranks that use it (a parameter a rank holds but did not
    use, e.g. the positions beside a tied head, adds zeros). One all-reduce of the flattened gradients: over
    `tied_group` (the ranks `rank_stages.embed_ranks` of this pipeline) where given, else over the whole pipeline
    `group`, to which a rank without the embedding adds zeros (on `device`). Nothing when one rank holds every
    use. `data_shard` = (data rank r, data size D) where the stages are FSDP2-sharded: each rank holds (and sums)
    its rows of the reduce-scattered gradients, the same rows on every pipeline rank of data rank r (a rank
    without the embedding adds zeros of that size: `row_range`)."""
    if len(rank_stages.embed_ranks) < 2:
        return
    params = dict(model.embed.named_parameters())  # materialized on ranks that hold the embedding, else meta
    held = bool(rank_stages.embed_names)
    if tied_group is not None:
        if not held:
            return
        group = tied_group

    def local_numel(p: torch.Tensor) -> int:
        if data_shard is None:
            return p.numel()
        if held:
            return _local(p).numel()
        from bigtrain.compat.fsdp2 import row_range

        return row_range(p.shape[0], *data_shard)[1] * p.shape[1:].numel()

    pieces = []
    for p in params.values():
        if held and p.grad is not None:
            pieces.append(_local(p.grad).reshape(-1))
        else:
            pieces.append(torch.zeros(local_numel(p), dtype=torch.float32 if p.is_meta else p.dtype,
                                      device=device if p.is_meta else p.device))
    flat = torch.cat(pieces)
    dist.all_reduce(flat, group=group)
    if not held:
        return
    offset = 0
    for p in params.values():
        local = _local(p)
        n = local.numel()
        grad = flat[offset:offset + n].view_as(local)
        if p.grad is None:
            if data_shard is not None:
                from bigtrain.compat.fsdp2 import sharded_like

                p.grad = sharded_like(p, grad.clone())
            else:
                p.grad = grad.clone()
        else:
            _local(p.grad).copy_(grad)
        offset += n


class PipelineRunner:
    """This rank's stages of `model` and the schedule that runs them, over the pipeline process `group` (ranks
    ordered by stage: group rank r is pipeline rank r). `materialize(piece)` allocates and initializes a piece of
    the meta model. `step(batch)` runs one step's forward and backward (gradients accumulate into the stage
    parameters; zeroing them is the caller's) and returns the loss on every rank. `loss_sum`: the criterion's
    summed loss (`bigtrain.models.loss.Criterion.loss_sum`, or the vocabulary-parallel one under tensor
    parallelism). `context`: under context parallelism the first stage gets this rank's share of the ids (document
    ids and padding whole, `pipeline_inputs`) and the last stage this rank's share of the labels."""

    def __init__(self, model: TransformerLM, schedule: str, virtual_stages: int, n_microbatches: int,
                 materialize: Callable[[nn.Module], None] | None, group: dist.ProcessGroup | None = None,
                 partition_method: str = "parameters", device: torch.device | str = "cpu",
                 documents: bool = False, cache_size: int = 4,
                 loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum,
                 stages: RankStages | None = None, context: ContextInputs | None = None) -> None:
        self.model, self.schedule_name, self.virtual_stages = model, schedule, virtual_stages
        self.n_microbatches, self.group, self.device = n_microbatches, group, torch.device(device)
        self.documents, self.cache_size, self.context = documents, cache_size, context
        self.pipeline = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if stages is None:  # built here (`parallelize` builds them for the torch_pipeline engine)
            assert materialize is not None, "PipelineRunner builds its stages only with a materialize function"
            stages = build_rank_stages(model, self.rank, self.pipeline, virtual_stages, schedule, partition_method,
                                       materialize, documents, context)
        self.stages = stages
        self.n_stages = self.pipeline * virtual_stages
        self.first = 0 in self.stages.indices
        self.last = self.n_stages - 1 in self.stages.indices
        self.last_rank = stage_rank(self.n_stages - 1, self.pipeline, virtual_stages, schedule)
        self.loss_fn = GlobalMeanLoss(loss_sum)
        self.tied_group: dist.ProcessGroup | None = None  # optional: the ranks stages.embed_ranks, made by the caller
        self.data_shard: tuple[int, int] | None = None  # (data rank, data size) where the stages are FSDP2-sharded
        self._schedules: OrderedDict[tuple, object] = OrderedDict()

    @property
    def modules(self) -> list[nn.Module]:
        return list(self.stages.modules)

    def _schedule_for(self, key: tuple, evaluation: tuple[int, Callable] | None = None):
        """The schedule for inputs of these shapes (made on first use; the least recently used beyond
        `cache_size` is dropped); `evaluation` = (micro-batches, metrics): a forward-only one."""
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        stages = [stage_class()(module, index, self.n_stages, self.device, group=self.group)
                  for module, index in zip(self.stages.modules, self.stages.indices, strict=True)]
        if evaluation is None:
            schedule = make_schedule(self.schedule_name, stages, self.n_microbatches, self.loss_fn)
        else:
            from bigtrain.compat.pipelining import forward_only_schedule

            placement = {r: stage_indices(r, self.pipeline, self.virtual_stages, self.schedule_name)
                         for r in range(self.pipeline)}
            schedule = forward_only_schedule(stages, *evaluation, placement)
        self._schedules[key] = schedule
        while len(self._schedules) > self.cache_size:
            self._schedules.popitem(last=False)
        return schedule

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        inputs = pipeline_inputs(batch, self.model.family, self.context)
        return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)

    def _labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"] if self.context is None else self.context.shard(batch["labels"])

    def _run(self, run: Callable[[], object]) -> None:
        """`run()`, the context-parallel tokens of the last micro-batch cleared after."""
        try:
            run()
        finally:
            if self.context is not None:
                self.context.clear()

    def step(self, batch: dict[str, torch.Tensor], targets: int | None = None) -> torch.Tensor:
        """Forward and backward of `batch` (this pipeline's share of the global batch: n_microbatches micro-batches
        along dim 0), then the tied gradients summed; returns this pipeline's Σ ce / N (a 0-d float tensor, the
        same on every rank). N = `targets`, the global batch's target count (default: `batch`'s own)."""
        inputs = self._inputs(batch)
        labels = self._labels(batch)
        rows = labels.shape[0]
        if rows % self.n_microbatches:
            raise ValueError(f"a batch of {rows} rows does not split into {self.n_microbatches} micro-batches")
        key = tuple(tuple(t.shape) for t in inputs) + (tuple(labels.shape),)
        schedule = self._schedule_for(key)
        self.loss_fn.targets = max(targets if targets is not None else int((labels != IGNORE_INDEX).sum()), 1)
        losses: list[torch.Tensor] = []
        args = tuple(t.to(self.device) for t in inputs) if self.first else ()
        kwargs = {"target": labels.to(self.device), "losses": losses} if self.last else {}
        self._run(lambda: schedule.step(*args, return_outputs=False, **kwargs))
        reduce_tied_grads(self.model, self.stages, self.group, self.tied_group, self.device, self.data_shard)
        loss = (torch.stack([x.detach().float() for x in losses]).sum() / self.loss_fn.backward_scale if self.last
                else torch.zeros((), dtype=torch.float32, device=self.device))
        return self._from_last(loss)

    def _from_last(self, t: torch.Tensor) -> torch.Tensor:
        """`t` of the rank holding the last stage, on every rank of the pipeline (one broadcast)."""
        dist.broadcast(t, src=dist.get_global_rank(self.group, self.last_rank) if self.group is not None
                       else self.last_rank, group=self.group)
        return t

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]], metrics: Callable[[torch.Tensor, torch.Tensor],
                 torch.Tensor], width: int) -> torch.Tensor:
        """Forward only (the schedule's `eval`) of the held-out `batches` as micro-batches; `metrics(logits,
        labels)` gives a float64 vector of `width` sums per micro-batch on the last stage; returns their total on
        every rank. The batches are filled (`fill_eval_batches`) to equal rows and padded to one length; the
        fillers add nothing. Every stage runs all micro-batches before the next stage of the rank (a forward-only
        schedule for any placement, `bigtrain.compat.pipelining`)."""
        count = len(batches)
        batch = stack_micro_batches(fill_eval_batches(batches, count))
        inputs = self._inputs(batch)
        labels = self._labels(batch)
        key = ("eval", count) + tuple(tuple(t.shape) for t in inputs) + (tuple(labels.shape),)
        schedule = self._schedule_for(key, (count, metrics))
        losses: list[torch.Tensor] = []
        args = tuple(t.to(self.device) for t in inputs) if self.first else ()
        kwargs = {"target": labels.to(self.device), "losses": losses} if self.last else {}
        for module in self.stages.modules:
            module.eval()
        try:
            self._run(lambda: schedule.eval(*args, **kwargs))
        finally:
            for module in self.stages.modules:
                module.train()
        total = (torch.stack([x.double() for x in losses]).sum(0) if self.last
                 else torch.zeros(width, dtype=torch.float64, device=self.device))
        return self._from_last(total)



def pipeline_step(runner: PipelineRunner, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One training step's forward and backward through `runner`'s schedule; the loss on every rank."""
    return runner.step(batch)
