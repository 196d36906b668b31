"""The sharded basic layers of tensor parallelism, and `TensorParallel` (this rank's place in its tensor group).

With T ranks, rank r holds
    ColumnParallelLinear    rows [r·n/T, (r+1)·n/T) of W (n output features) and of b: y_r = x W_rᵀ + b_r
    RowParallelLinear       columns [r·n/T, (r+1)·n/T) of W (n input features): y = Σ_r x_r W_rᵀ + b, the sum an
                            all-reduce (or a reduce-scatter along the sequence under sequence parallelism)
    VocabParallelEmbedding  rows [r·V/T, (r+1)·V/T) of E: ids outside give 0, the all-reduce sums the one hit
    VocabParallelHead       the logits of this rank's vocabulary slice, [.., V/T]
and dropout on sharded activations (`ShardedDropout`, `ShardedAttentionCore`) draws a mask of this rank's own
(`bigtrain.parallel.random`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.models.attention import AttentionCore
from bigtrain.models.init import Shard
from bigtrain.parallel.collectives import (
    copy_to_tensor_region,
    gather_sequence,
    reduce_from_tensor_region,
    reduce_scatter_sequence,
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
