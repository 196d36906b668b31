"""Megatron-style tensor parallelism (Shoeybi et al. 2019), applied to an unchanged model.

Each sublayer is split across the T ranks of a tensor group so that one all-reduce joins it again:

    attention  Q, K, V  column-parallel: rank r holds heads [r·H/T, (r+1)·H/T) (and its share of the
                        grouped key/value heads); attention runs on local heads only
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.config.model_checks import tensor_split_problems
from bigtrain.models import TransformerLM
from bigtrain.models.attention import Attention, AttentionCore
from bigtrain.models.blocks import Block
from bigtrain.models.embedding import Embedding
from bigtrain.models.init import Shard
from bigtrain.models.layers import (
    ACTIVATIONS,
    FeedForward,
    HeadTransform,
    LogitBias,
    RelativePositionBias,
    RMSNorm,
    rms_norm,
)
from bigtrain.parallel.collectives import (
    copy_to_tensor_region,
    gather_sequence,
    reduce_from_tensor_region,
    reduce_scatter_sequence,
    split_sequence,
)
from bigtrain.parallel.random import run_with_rank_rng


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor group. `group` may be None on the meta device (shapes only)."""

    group: Any
    rank: int
    size: int
    sequence_parallel: bool = False

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (or sequence-sharded) activations into a sharded sublayer."""
        return gather_sequence(x, self.group) if self.sequence_parallel else copy_to_tensor_region(x, self.group)

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Partial sums out of a row-parallel layer: all-reduce, or reduce-scatter along the sequence."""
        if self.sequence_parallel:
            return reduce_scatter_sequence(x, self.group)
        return reduce_from_tensor_region(x, self.group)

    def shard(self, dim: int) -> Shard:
        return Shard(dim=dim, index=self.rank, count=self.size)

    def __deepcopy__(self, memo: dict) -> TensorParallel:
        # A process group is a communicator, not state: a copied model talks to the same group.
        return self

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}" + (", sequence-parallel" if self.sequence_parallel else "")


class ColumnParallelLinear(nn.Linear):
    """y_r = x W_rᵀ + b_r with W_r = rows [r·n/T, (r+1)·n/T) of W: this rank's output features.

    The input must already be in the tensor region (the sublayer enters once for Q, K and V, or for up and
    gate).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(in_features, out_features // tp.size, bias=bias, device="meta")
        self.tp = tp

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.tp.describe()}"


class RowParallelLinear(nn.Linear):
    """y = Σ_r x_r W_rᵀ + b, W_r = columns [r·n/T, (r+1)·n/T) of W; x_r is this rank's slice of the input."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(in_features // tp.size, out_features, bias=bias, device="meta")
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.leave(F.linear(x, self.weight))
        if self.bias is None:
            return y
        # Under sequence parallelism each rank adds b to its own tokens: the gradient of b is a partial sum.
        return y + (copy_to_tensor_region(self.bias, self.tp.group) if self.tp.sequence_parallel else self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.tp.describe()}"


class VocabParallelEmbedding(nn.Embedding):
    """E[ids] with E cut by rows: rank r looks up ids in [r·V/T, (r+1)·V/T), others give 0; all-reduce."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel) -> None:
        super().__init__(vocab_size // tp.size, dim, device="meta")
        self.tp = tp
        self.start = tp.rank * (vocab_size // tp.size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_region(out, self.tp.group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ids from {self.start}, {self.tp.describe()}"


class VocabParallelHead(ColumnParallelLinear):
    """The output head: logits of this rank's vocabulary slice; its input enters the tensor region here."""

    def __init__(self, d_model: int, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__(d_model, vocab_size, bias=False, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.tp.enter(x), self.weight)


class ShardedDropout(nn.Dropout):
    """Dropout on a sharded activation (FFN hidden units, a sequence shard): a mask of this tensor rank's own."""

    def __init__(self, p: float, rank: int) -> None:
        super().__init__(p)
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0:
            return run_with_rank_rng(super().forward, self.rank, (x,), {})
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask of tensor rank {self.rank}"


class ShardedAttentionCore(AttentionCore):
    """The attention core over this rank's heads: attention-probability dropout draws a mask of its own."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, q, k, v, mask, causal, dropout, return_weights, scale=None, bias=None):
        args = (q, k, v, mask, causal, dropout, return_weights, scale, bias)
        if dropout > 0:
            return run_with_rank_rng(super().forward, self.rank, args, {})
        return super().forward(*args)

    def extra_repr(self) -> str:
        return f"heads of tensor rank {self.rank}"


class TensorParallelAttention(Attention):
    """Attention over this rank's heads: Q, K, V column-parallel, the output row-parallel; the input (and the
    memory of cross-attention) enters the tensor region once for all three projections."""

    def __init__(self, attn: Attention, tp: TensorParallel) -> None:
        d = attn.q_proj.in_features
        bias = attn.q_proj.bias is not None
        super().__init__(d, attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim,
                         bias, attn.dropout, attn.causal, attn.rotary, scale=attn.scale is None)
        self.tp = tp
        self.q_proj = ColumnParallelLinear(d, attn.q_proj.out_features, bias, tp)
        self.k_proj = ColumnParallelLinear(d, attn.k_proj.out_features, bias, tp)
        self.v_proj = ColumnParallelLinear(d, attn.v_proj.out_features, bias, tp)
        self.o_proj = RowParallelLinear(attn.o_proj.in_features, d, bias, tp)
        self.core = ShardedAttentionCore(tp.rank)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, position_bias: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        memory = None if memory is None else self.tp.enter(memory)
        return super().forward(self.tp.enter(x), key_padding, memory, position_bias, position_ids, cache,
                               document_ids)


class TensorParallelFeedForward(FeedForward):
    """FFN over this rank's d_ff / T hidden units: up (and gate) column-parallel, down row-parallel, the hidden
    dropout with a mask of this rank's own."""

    def __init__(self, ffn: FeedForward, tp: TensorParallel) -> None:
        d, d_ff, bias = ffn.up.in_features, ffn.up.out_features, ffn.up.bias is not None
        super().__init__(d, d_ff, ffn.activation, bias, ffn.dropout.p)
        self.tp = tp
        self.up = ColumnParallelLinear(d, d_ff, bias, tp)
        if self.gate is not None:
            self.gate = ColumnParallelLinear(d, d_ff, bias, tp)
        self.down = RowParallelLinear(d_ff, d, bias, tp)
        self.dropout = ShardedDropout(ffn.dropout.p, tp.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.tp.enter(x))


class TensorParallelEmbedding(Embedding):
    """The input embedding with a vocabulary-parallel token table; under sequence parallelism its output
    (replicated, one dropout mask on every rank) is cut into this rank's sequence shard."""

    def __init__(self, model: TransformerLM, tp: TensorParallel) -> None:
        super().__init__(model.cfg, model.vocab_size)
        self.tp = tp
        self.tokens = VocabParallelEmbedding(model.vocab_size, model.cfg.d_model, tp)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = super().forward(ids, position_ids, token_type_ids)
        return split_sequence(x, self.tp.group) if self.tp.sequence_parallel else x

    def extra_repr(self) -> str:
        return "output cut along the sequence" if self.tp.sequence_parallel else ""


class TensorParallelPositionBias(RelativePositionBias):
    """The relative position bias of this rank's heads: columns [r·H/T, (r+1)·H/T) of the table."""

    def __init__(self, bias: RelativePositionBias, tp: TensorParallel) -> None:
        super().__init__(bias.table.embedding_dim // tp.size, bias.buckets, bias.max_distance, bias.bidirectional)
        self.tp = tp

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads of {self.tp.describe()}"


class VocabParallelLogitBias(LogitBias):
    """The logit bias of this rank's vocabulary slice."""

    def __init__(self, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__(vocab_size // tp.size)
        self.tp = tp

    def extra_repr(self) -> str:
        return self.tp.describe()


def _enter(p: torch.Tensor | None, tp: TensorParallel) -> torch.Tensor | None:
    return None if p is None else copy_to_tensor_region(p, tp.group)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """LayerNorm on this rank's sequence shard: weight and bias enter the tensor region, so their gradients
    sum over the shards."""

    def __init__(self, norm: nn.LayerNorm, tp: TensorParallel) -> None:
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                         bias=norm.bias is not None)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _enter(self.weight, self.tp), _enter(self.bias, self.tp),
                            self.eps)


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm on this rank's sequence shard (its weight's gradient sums over the shards)."""

    def __init__(self, norm: RMSNorm, tp: TensorParallel) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, _enter(self.weight, self.tp), self.eps)


class SequenceParallelHeadTransform(HeadTransform):
    """The head transform on this rank's sequence shard: its parameters enter the tensor region (gradients
    sum over the shards)."""

    def __init__(self, transform: HeadTransform, tp: TensorParallel) -> None:
        d, bias = transform.dense.in_features, transform.dense.bias is not None
        norm = "rmsnorm" if isinstance(transform.norm, RMSNorm) else "layernorm"
        super().__init__(d, transform.activation, norm, transform.norm.eps, bias)
        self.tp = tp
        self.norm = _sequence_parallel_norm(self.norm, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, _enter(self.dense.weight, self.tp), _enter(self.dense.bias, self.tp))
        return self.norm(ACTIVATIONS[self.activation](hidden))


def _sequence_parallel_norm(norm: nn.Module, tp: TensorParallel) -> nn.Module:
    if isinstance(norm, nn.LayerNorm):
        return SequenceParallelLayerNorm(norm, tp)
    if isinstance(norm, RMSNorm):
        return SequenceParallelRMSNorm(norm, tp)
    if isinstance(norm, nn.Identity):
        return norm
    raise TypeError(f"sequence parallelism does not know the norm {type(norm).__name__}")


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
                    _plan_sublayer(plan, prefix + name, child, ("q_proj", "k_proj", "v_proj"), "o_proj", tp)
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
                    setattr(parent, name, _sequence_parallel_norm(child, tp))
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
