"""`parallelize`: the one place where the unchanged single-device model becomes its parallel form.

In a fixed order, as torchtitan's `parallelize_llama`:

    1. tensor and sequence parallelism   layers replaced by their shards (`tensor.py`), vocabulary-parallel loss
       context parallelism               attention cores replaced by ring / Ulysses cores over the context group
                                         (`context/core.py`), which read each micro-batch's split
                                         (`context/inputs.py`: the engines split every micro-batch by it)
       expert parallelism                MoE blocks replaced by their rank's slice of the routed experts, tokens
                                         dispatched and combined by all-to-all over the expert group (`expert.py`;
                                         under FSDP2 also with parallel.expert=1: every expert, no exchange)
       FP8 (`train.precision=fp8`)       the blocks' Linear layers, tensor-parallel ones included, replaced by
                                         torchao-based FP8 layers (`fp8.py`), so that what follows wraps them
    2. activation checkpointing          blocks or attention cores wrapped (`activation_checkpointing.py`)
    3. torch.compile (`train.compile`)   each block compiled on its own (`compile.py`), after tensor
                                         parallelism and checkpointing, before the pipeline split
    4. pipeline split or materialize     a pipeline stage allocates and initializes only its own layers
                                         (DeepSpeed's `PipelineModule`, or this rank's stages of a
                                         torch.distributed.pipelining schedule); any other layout allocates and
                                         initializes the whole (sharded) model

Weights are initialized in step 4 and only there, through `bigtrain.models.materialize`, whatever the layout:
each parameter (or its shard) is drawn from its own generator, so every layout starts from exactly the weights
of the single-device model. The engine the layout names (`bigtrain.engine.build_engine`) then wraps the result:
plain PyTorch, DeepSpeed data parallelism / ZeRO, DeepSpeed's pipeline engine, or fairscale's sharded engines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.models import TransformerLM, materialize
from bigtrain.models.init import Shard
from bigtrain.models.loss import Criterion
from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from bigtrain.parallel.compile import apply_compile
from bigtrain.parallel.context.core import apply_context_parallel
from bigtrain.parallel.context.inputs import ContextInputs
from bigtrain.parallel.expert import apply_expert_parallel, mark_expert_parallel
from bigtrain.parallel.stages import RankStages, build_rank_stages, mark_tied_copies
from bigtrain.parallel.tensor import apply_tensor_parallel, mark_tensor_parallel
from bigtrain.parallel.tensor_layers import TensorParallel

if TYPE_CHECKING:
    from bigtrain.parallel.fp8 import Fp8Conversion


@dataclass
class ParallelModel:
    """A model in its parallel form on this rank, and what engines and the trainer need to run it.

    model: the whole model's structure with this rank's shards; under pipeline parallelism only this stage's
    layers are allocated (the rest stay on the meta device) and `stage` is the DeepSpeed `PipelineModule` that
    runs them. criterion: the loss over this rank's logits (vocabulary shards under tensor parallelism).
    pad_multiple: sequences are padded to a multiple of this (the tensor size under sequence parallelism; 2C
    under context parallelism, and C·T with both). context: the split of micro-batches over the context group
    (None without context parallelism).
    stages: under PyTorch's pipeline schedules (engine torch_pipeline), this rank's stage modules instead.
    fp8: what `train.precision=fp8` converted (None in other precisions).
    """

    model: TransformerLM
    criterion: Criterion
    layout: Layout
    shards: dict[str, Shard] = field(default_factory=dict)
    pad_multiple: int = 1
    stage: nn.Module | None = None
    context: ContextInputs | None = None
    stages: RankStages | None = None
    fp8: Fp8Conversion | None = None

    @property
    def module(self) -> nn.Module:
        """What an engine wraps: the pipeline stage, or the model."""
        return self.stage if self.stage is not None else self.model


def parallelize(model: TransformerLM, cfg: Config, groups: ParallelGroups | None,
                device: str | torch.device) -> ParallelModel:
    """Turn `model` (built on the meta device) into this rank's part of `groups.layout` on `device`; with
    `groups` None, the single-device model. Also seeds the default generators for dropout: equal across the
    tensor ranks of a replica, distinct across data replicas and pipeline stages."""
    from bigtrain.parallel.cross_entropy import VocabParallelCriterion

    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("parallelize takes a model on the meta device: build_model(cfg.model, vocab, 'meta')")
    p, seed = cfg.parallel, cfg.train.seed
    layout, rank = (groups.layout, groups.rank) if groups is not None else (Layout(), 0)
    result = ParallelModel(model=model, criterion=Criterion(), layout=layout)

    # 1. tensor and sequence parallelism, then context parallelism
    if layout.tensor > 1:
        assert groups is not None
        tp = TensorParallel(groups.tensor_group, groups.get_tensor_model_parallel_rank(), layout.tensor,
                            p.sequence_parallel)
        result.shards = apply_tensor_parallel(model, tp)
        result.criterion = VocabParallelCriterion(tp.group, tp.rank, tp.size)
        result.pad_multiple = tp.size if tp.sequence_parallel else 1
    if layout.context > 1:
        assert groups is not None
        result.context = ContextInputs(groups.context_group, cfg.model.family)
        apply_context_parallel(model, result.context, p.context_attention)
        # 2C chunks; under sequence parallelism each rank's S/C tokens split again over the tensor group
        result.pad_multiple = math.lcm(2 * layout.context, layout.context * result.pad_multiple)
    if layout.expert > 1 or layout.engine == "fsdp2":  # FSDP2 shards each block's experts as one unit
        assert groups is not None
        apply_expert_parallel(model, groups.expert_group, groups.expert_rank, layout.expert)
    if cfg.train.precision == "fp8":
        from bigtrain.parallel.fp8 import apply_fp8  # torchao is imported only when FP8 is asked for

        result.fp8 = apply_fp8(model, cfg.train.fp8_recipe, torch.device(device))

    # 2. activation checkpointing
    # (a pipeline schedule runs later micro-batches' forwards before a recompute: it gets its own tokens back)
    apply_activation_checkpointing(model, p.activation_checkpointing, p.checkpoint_every_n_layers,
                                   context=result.context if layout.pipeline > 1 else None)

    # 3. torch.compile of each block (regional; a checkpointed block is compiled whole)
    if cfg.train.compile:
        apply_compile(model, device, retain_graph=layout.pipeline > 1)

    torch.manual_seed(seed + layout.seed_offset(rank))

    # 4. the one initialization path: per pipeline stage, or the whole model
    def materialize_piece(piece: nn.Module) -> None:
        materialize(model, device, seed, result.shards, piece=piece)

    if layout.engine == "torch_pipeline":
        assert groups is not None
        result.stages = build_rank_stages(model, groups.coords.pipe, layout.pipeline, p.virtual_stages,
                                          p.pipeline_schedule, p.partition_method, materialize_piece,
                                          documents=cfg.data.document_masking, context=result.context)
        mark_tied_copies(model, result.stages)
    elif layout.pipeline > 1:
        from bigtrain.parallel.pipeline_module import build_pipeline_module

        result.stage = build_pipeline_module(model, layout, p.partition_method, materialize_piece,
                                             documents=cfg.data.document_masking, context=result.context)
    else:
        materialize(model, device, seed, result.shards)
    mark_tensor_parallel(model, result.shards)
    mark_expert_parallel(model)
    return result
