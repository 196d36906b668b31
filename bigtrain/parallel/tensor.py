"""Megatron-style tensor parallelism (Shoeybi et al. 2019), applied to an unchanged model.

Each sublayer is split across the T ranks of a tensor group so that one all-reduce joins it again:

    attention  Q, K, V  column-parallel (one linear, rows blocked by key/value head): rank r holds heads
                        [r·H/T, (r+1)·H/T) and its share of the grouped key/value heads, one contiguous
                        chunk of rows; attention runs on local heads only
               out      row-parallel: y = Σ_r o_r W_oᵣᵀ (all-reduce), + b once
    FFN        up, gate column-parallel (d_ff / T hidden units each), down row-parallel
    embedding  vocabulary-parallel: rank r holds rows [r·V/T, (r+1)·V/T); ids outside give 0, all-reduce
    head       vocabulary-parallel logits [.., V/T] (tied to the embedding shard when the model ties them);
               the loss is `VocabParallelCriterion`, which never gathers the full logits; the logit bias
               is cut like the head, the head transform (BERT) stays whole
    relative   T5's position-bias table [buckets, H] cut by heads (columns), like the attention it feeds

A replicated input enters a sharded sublayer through `copy_to_tensor_region` (its backward all-reduces
the gradient) and partial sums leave through `reduce_from_tensor_region`.

Sequence parallelism (Korthikanti et al. 2022) keeps the residual stream cut along the sequence between
sublayers: norms and residual dropout run on T/T_p tokens, sublayers gather the sequence on entry and
reduce-scatter on exit (same bytes as one all-reduce), and parameters used on sequence shards (norm weights,
row-parallel biases) sum their gradients over the tensor group.

Dropout in sharded regions draws a mask per tensor rank, in replicated regions the same mask on every rank
(`bigtrain.parallel.random`).

Every piece is a module class of its own (a subclass of the layer it replaces), so `print(model)` shows
the split: `TensorParallelAttention`, `ColumnParallelLinear`, `SequenceParallelLayerNorm`, ... Subclasses
keep their parent's attribute names, so parameter names and checkpoints are those of the unsplit model.
`apply_tensor_parallel` works on the meta device; `bigtrain.models.materialize` then draws each shard as a
slice of the full tensor, so a rank never holds more than one full parameter at a time.

This module applies the split (`apply_tensor_parallel`, `shard_plan`, `mark_tensor_parallel`); the sharded basic
layers and `TensorParallel` are in `bigtrain.parallel.tensor_layers`, the replaced sublayers (attention, FFN,
embedding, position and logit bias, sequence-parallel norms) in `bigtrain.parallel.tensor_sublayers`.
"""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.config.model_checks import tensor_split_problems
from bigtrain.models import TransformerLM
from bigtrain.models.attention import Attention
from bigtrain.models.blocks import Block
from bigtrain.models.init import Shard
from bigtrain.models.layers import FeedForward, HeadTransform, LogitBias, RelativePositionBias, RMSNorm
from bigtrain.parallel.tensor_layers import ShardedDropout, TensorParallel, VocabParallelHead
from bigtrain.parallel.tensor_sublayers import (
    SequenceParallelHeadTransform,
    TensorParallelAttention,
    TensorParallelEmbedding,
    TensorParallelFeedForward,
    TensorParallelPositionBias,
    VocabParallelLogitBias,
    sequence_parallel_norm,
)


def _plan_sublayer(plan: dict[str, Shard], prefix: str, module: nn.Module, columns: tuple[str, ...], row: str,
                   tp: TensorParallel) -> None:
    """Column-parallel linears are cut by output (weight and bias), the row-parallel one by input (its bias
    stays whole)."""
    for name in columns:
        linear = getattr(module, name)
        if linear is None:  # e.g. no gate without SwiGLU
            continue
        plan[f"{prefix}.{name}.weight"] = tp.shard(0)
        if linear.bias is not None:
            plan[f"{prefix}.{name}.bias"] = tp.shard(0)
    plan[f"{prefix}.{row}.weight"] = tp.shard(1)


def apply_tensor_parallel(model: TransformerLM, tp: TensorParallel) -> dict[str, Shard]:
    """Replace the layers of `model` (on the meta device) by this rank's parallel ones; returns which
    parameters are shards, {parameter name: Shard}."""
    problems = tensor_split_problems(model.cfg, model.vocab_size, tp.size)
    if problems:
        raise ValueError("cannot split the model over the tensor group: " + "; ".join(problems))
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("apply_tensor_parallel works on a model on the meta device (built with "
                         "build_model(..., 'meta')); `materialize` then draws the shards")
    plan: dict[str, Shard] = {}
    with torch.device("meta"):
        for parent_name, parent in list(model.named_modules()):
            prefix = f"{parent_name}." if parent_name else ""
            for name, child in list(parent.named_children()):
                if isinstance(child, Attention):
                    setattr(parent, name, TensorParallelAttention(child, tp))
                    _plan_sublayer(plan, prefix + name, child, ("qkv_proj",), "o_proj", tp)
                elif isinstance(child, FeedForward):
                    setattr(parent, name, TensorParallelFeedForward(child, tp))
                    _plan_sublayer(plan, prefix + name, child, ("up", "gate"), "down", tp)
                elif isinstance(child, RelativePositionBias):
                    setattr(parent, name, TensorParallelPositionBias(child, tp))
                    plan[f"{prefix}{name}.table.weight"] = tp.shard(1)
                elif isinstance(child, LogitBias):
                    setattr(parent, name, VocabParallelLogitBias(model.vocab_size, tp))
                    plan[f"{prefix}{name}.bias"] = tp.shard(0)
                elif tp.sequence_parallel and isinstance(child, HeadTransform):
                    setattr(parent, name, SequenceParallelHeadTransform(child, tp))
                elif tp.sequence_parallel and isinstance(child, nn.LayerNorm | RMSNorm):
                    setattr(parent, name, sequence_parallel_norm(child, tp))
                elif tp.sequence_parallel and isinstance(parent, Block) and name == "dropout":
                    setattr(parent, name, ShardedDropout(child.p, tp.rank))  # the residual's sequence shard
        model.embed = TensorParallelEmbedding(model, tp)
        model.head = VocabParallelHead(model.cfg.d_model, model.vocab_size, tp)
    plan["embed.tokens.weight"] = tp.shard(0)
    plan["head.weight"] = tp.shard(0)
    model.tie_weights()
    return plan


def mark_tensor_parallel(model: nn.Module, plan: dict[str, Shard]) -> None:
    """Tag sharded parameters the way DeepSpeed (and bigtrain's norms) recognize them: gradient norms sum
    their squares over the tensor group, and count replicated parameters once."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in plan:
            p.tensor_model_parallel = True
            p.partition_dim = plan[name].dim
            p.partition_stride = 1


def is_tensor_parallel(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def shard_plan(cfg: ModelConfig, vocab_size: int, tensor: int) -> dict[str, Shard]:
    """Which parameters a `tensor`-way split cuts, and along which dimension (no process group needed)."""
    from bigtrain.models import build_model

    model = build_model(cfg, vocab_size, "meta")
    return apply_tensor_parallel(model, TensorParallel(group=None, rank=0, size=tensor))
