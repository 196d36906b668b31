"""Megatron-style tensor parallelism (Shoeybi et al. 2019), applied to an unchanged model.

Each sublayer is split across the T ranks of a tensor group so that one all-reduce joins it again:

    attention  Q, K, V  column-parallel: rank r holds heads [r·H/T, (r+1)·H/T) (and its share of the
                        grouped key/value heads); attention runs on local heads only
               out      row-parallel: y = Σ_r o_r W_oᵣᵀ (all-reduce), + b once
    FFN        up, gate column-parallel (d_ff / T hidden units each), down row-parallel
    embedding  vocabulary-parallel: rank r holds rows [r·V/T, (r+1)·V/T); ids outside give 0, all-reduce
    head       vocabulary-parallel logits [.., V/T] (tied to the embedding shard when the model ties them);
               the loss is `VocabParallelCriterion`, which never gathers the full logits

A replicated input enters a sharded sublayer through `copy_to_tensor_region` (its backward all-reduces
the gradient) and partial sums leave through `reduce_from_tensor_region`.

Sequence parallelism (Korthikanti et al. 2022) keeps the residual stream cut along the sequence between
sublayers: norms and residual dropout run on T/T_p tokens, sublayers gather the sequence on entry and
reduce-scatter on exit (same bytes as one all-reduce), and parameters used on sequence shards (norm weights,
row-parallel biases) sum their gradients over the tensor group.

Dropout in sharded regions draws a mask per tensor rank, in replicated regions the same mask on every rank
(`bigtrain.parallel.random`). Works on the meta device: apply first, then materialize and initialize
(`build_tensor_parallel_model`), so a rank never holds more than one full parameter at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.models import TransformerLM, build_model
from bigtrain.models.attention import Attention
from bigtrain.models.blocks import Block
from bigtrain.models.embedding import Embedding
from bigtrain.models.init import Shard
from bigtrain.models.layers import FeedForward, RMSNorm, rms_norm
from bigtrain.parallel.collectives import (
    copy_to_tensor_region,
    gather_sequence,
    reduce_from_tensor_region,
    reduce_scatter_sequence,
    split_sequence,
)
from bigtrain.parallel.random import rank_rng_when


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


class ColumnParallelLinear(nn.Linear):
    """y_r = x W_rᵀ + b_r with W_r = rows [r·n/T, (r+1)·n/T) of W: this rank's output features.

    With `enter_region` the input first enters the tensor region (used by the output head); Q/K/V and the
    FFN input projections leave that to their sublayer, which enters once for all of them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel,
                 enter_region: bool = False) -> None:
        super().__init__(in_features, out_features // tp.size, bias=bias, device="meta")
        self.tp, self.enter_region = tp, enter_region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enter_region:
            x = self.tp.enter(x)
        return F.linear(x, self.weight, self.bias)


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


def check_divisible(cfg: ModelConfig, vocab_size: int | None, tensor: int) -> list[str]:
    """Problems that stop a model from splitting over `tensor` ranks, each naming both numbers."""
    problems = []
    sizes = [("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads), ("model.d_ff", cfg.d_ff)]
    for key, value in sizes:
        if value is not None and value % tensor:
            problems.append(f"{key}={value} is not divisible by parallel.tensor={tensor}")
    if vocab_size is not None and vocab_size % tensor:
        padded = -(-vocab_size // tensor) * tensor
        problems.append(f"the vocabulary of {vocab_size} ids is not divisible by parallel.tensor={tensor} (pad it "
                        f"with model.vocab_size={padded})")
    return problems


def _linear_args(linear: nn.Linear) -> tuple[int, int, bool]:
    return linear.in_features, linear.out_features, linear.bias is not None


def _sequence_parallel_norm(norm: nn.Module, tp: TensorParallel) -> None:
    """The norm runs on a sequence shard: its weight and bias enter the region so their gradients sum."""
    def param(p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else copy_to_tensor_region(p, tp.group)

    if isinstance(norm, nn.LayerNorm):
        norm.forward = lambda x: F.layer_norm(x, norm.normalized_shape, param(norm.weight), param(norm.bias),
                                              norm.eps)
    elif isinstance(norm, RMSNorm):
        norm.forward = lambda x: rms_norm(x, param(norm.weight), norm.eps)
    elif not isinstance(norm, nn.Identity):
        raise TypeError(f"sequence parallelism does not know the norm {type(norm).__name__}")


def _shard_dropout(dropout: nn.Dropout, tp: TensorParallel) -> None:
    dropout.forward = rank_rng_when(dropout.forward, tp.rank, lambda *a, **k: dropout.training and dropout.p > 0)


def _split_linears(module: nn.Module, prefix: str, columns: tuple[str, ...], row: str, tp: TensorParallel,
                   plan: dict[str, Shard]) -> None:
    """Replace the `columns` linears of `module` by column-parallel ones (weight and bias cut by output) and
    the `row` linear by a row-parallel one (weight cut by input, bias whole); record the cuts in `plan`."""
    for name in columns:
        if getattr(module, name) is None:  # e.g. no gate without SwiGLU
            continue
        setattr(module, name, ColumnParallelLinear(*_linear_args(getattr(module, name)), tp))
        plan[f"{prefix}.{name}.weight"] = tp.shard(0)
        if getattr(module, name).bias is not None:
            plan[f"{prefix}.{name}.bias"] = tp.shard(0)
    setattr(module, row, RowParallelLinear(*_linear_args(getattr(module, row)), tp))
    plan[f"{prefix}.{row}.weight"] = tp.shard(1)


def _parallelize_attention(attn: Attention, prefix: str, tp: TensorParallel, plan: dict[str, Shard]) -> None:
    _split_linears(attn, prefix, ("q_proj", "k_proj", "v_proj"), "o_proj", tp, plan)
    forward = attn.forward

    def sharded_forward(x: torch.Tensor, key_padding: torch.Tensor | None = None,
                        memory: torch.Tensor | None = None) -> torch.Tensor:
        return forward(tp.enter(x), key_padding, None if memory is None else tp.enter(memory))

    attn.forward = sharded_forward
    # Attention-probability dropout acts on this rank's heads: a mask of its own.
    attn.core = rank_rng_when(attn.core, tp.rank, lambda q, k, v, mask, causal, dropout, weights: dropout > 0)


def _parallelize_ffn(ffn: FeedForward, prefix: str, tp: TensorParallel, plan: dict[str, Shard]) -> None:
    _split_linears(ffn, prefix, ("up", "gate"), "down", tp, plan)
    forward = ffn.forward
    ffn.forward = lambda x: forward(tp.enter(x))
    _shard_dropout(ffn.dropout, tp)  # on this rank's hidden units


def apply_tensor_parallel(model: TransformerLM, tp: TensorParallel) -> dict[str, Shard]:
    """Rewrite `model` (on the meta device) into this rank's shard; returns {parameter name: Shard}."""
    problems = check_divisible(model.cfg, model.vocab_size, tp.size)
    if problems:
        raise ValueError("cannot split the model over the tensor group: " + "; ".join(problems))
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("apply_tensor_parallel works on a model on the meta device (see "
                         "build_tensor_parallel_model); initialization then draws the shards")
    plan: dict[str, Shard] = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, Attention):
            _parallelize_attention(module, name, tp, plan)
        elif isinstance(module, FeedForward):
            _parallelize_ffn(module, name, tp, plan)

    embed: Embedding = model.embed
    embed.tokens = VocabParallelEmbedding(embed.tokens.num_embeddings, embed.tokens.embedding_dim, tp)
    plan["embed.tokens.weight"] = tp.shard(0)
    model.head = ColumnParallelLinear(*_linear_args(model.head), tp, enter_region=True)
    plan["head.weight"] = tp.shard(0)
    model.tie_weights()

    if tp.sequence_parallel:
        # Embedding output (replicated, one dropout mask everywhere) is cut into sequence shards; blocks and
        # final norms then run on shards; the head gathers the sequence again.
        embed_forward = embed.forward
        embed.forward = lambda ids, offset=0: split_sequence(embed_forward(ids, offset), tp.group)
        for module in modules.values():
            if isinstance(module, Block):
                _shard_dropout(module.dropout, tp)
                for norm in (module.self_attn_norm, module.cross_attn_norm, module.ffn_norm):
                    if norm is not None:
                        _sequence_parallel_norm(norm, tp)
        for name in ("final_norm", "encoder_norm"):
            if hasattr(model, name):
                _sequence_parallel_norm(getattr(model, name), tp)
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


def build_tensor_parallel_model(cfg: ModelConfig, vocab_size: int, device: str | torch.device, seed: int,
                                tp: TensorParallel) -> tuple[TransformerLM, dict[str, Shard]]:
    """This rank's shard of the model that `build_model(cfg, vocab_size, seed=seed)` builds whole."""
    plan: dict[str, Shard] = {}

    def transform(model: TransformerLM) -> dict[str, Shard]:
        plan.update(apply_tensor_parallel(model, tp))
        return plan

    model = build_model(cfg, vocab_size, device, seed, transform=transform)
    if torch.device(device).type != "meta":
        mark_tensor_parallel(model, plan)
    return model, plan


def shard_plan(cfg: ModelConfig, vocab_size: int, tensor: int) -> dict[str, Shard]:
    """Which parameters a `tensor`-way split cuts, and along which dimension (no process group needed)."""
    model = build_model(cfg, vocab_size, "meta")
    return apply_tensor_parallel(model, TensorParallel(group=None, rank=0, size=tensor))
