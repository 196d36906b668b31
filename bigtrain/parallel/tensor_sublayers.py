"""The model's sublayers replaced by their tensor- and sequence-parallel forms, each a subclass of the layer it
replaces (same attribute names, so parameter names and checkpoints are those of the unsplit model).

    TensorParallelAttention    Q/K/V column-parallel (heads [r·H/T, (r+1)·H/T)), the output row-parallel
    TensorParallelFeedForward  up (and gate) column-parallel (d_ff / T hidden units), down row-parallel
    TensorParallelEmbedding    a vocabulary-parallel token table; under sequence parallelism the output is cut
                               into this rank's sequence shard
    TensorParallelPositionBias columns [r·H/T, (r+1)·H/T) of T5's [buckets, H] table
    VocabParallelLogitBias     the logit bias of this rank's vocabulary slice
    SequenceParallel*          norms and the head transform on this rank's sequence shard: their parameters enter
                               the tensor region, so ∂L/∂w = Σ_shards ∂L_s/∂w (an all-reduce in backward)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.models import TransformerLM
from bigtrain.models.attention import Attention
from bigtrain.models.embedding import Embedding
from bigtrain.models.layers import (
    ACTIVATIONS,
    FeedForward,
    HeadTransform,
    LogitBias,
    RelativePositionBias,
    RMSNorm,
    rms_norm,
)
from bigtrain.parallel.collectives import copy_to_tensor_region, split_sequence
from bigtrain.parallel.tensor_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedAttentionCore,
    ShardedDropout,
    TensorParallel,
    VocabParallelEmbedding,
)


class TensorParallelAttention(Attention):
    """Attention over this rank's heads: the Q/K/V projection column-parallel (its rows are blocked by key/value
    head, so rank r's chunk holds key/value heads [r·H_kv/T, (r+1)·H_kv/T) and their query heads), the output
    row-parallel; the input (and the memory of cross-attention) enters the tensor region once."""

    def __init__(self, attn: Attention, tp: TensorParallel) -> None:
        d = attn.qkv_proj.in_features
        bias = attn.qkv_proj.bias is not None
        n_heads = attn.o_proj.in_features // attn.head_dim
        super().__init__(d, n_heads, n_heads // attn.groups, bias, attn.dropout, attn.causal, attn.rotary,
                         scale=attn.scale is None)
        self.tp = tp
        self.qkv_proj = ColumnParallelLinear(d, attn.qkv_proj.out_features, bias, tp)
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
    """A parameter into the tensor region (its gradient then sums over the tensor group); None stays None."""
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
        self.norm = sequence_parallel_norm(self.norm, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, _enter(self.dense.weight, self.tp), _enter(self.dense.bias, self.tp))
        return self.norm(ACTIVATIONS[self.activation](hidden))


def sequence_parallel_norm(norm: nn.Module, tp: TensorParallel) -> nn.Module:
    """The sequence-parallel form of a norm (LayerNorm, RMSNorm; Identity stays as it is); TypeError for others."""
    if isinstance(norm, nn.LayerNorm):
        return SequenceParallelLayerNorm(norm, tp)
    if isinstance(norm, RMSNorm):
        return SequenceParallelRMSNorm(norm, tp)
    if isinstance(norm, nn.Identity):
        return norm
    raise TypeError(f"sequence parallelism does not know the norm {type(norm).__name__}")
