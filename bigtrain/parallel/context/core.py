"""Context-parallel attention cores: what `apply_context_parallel` puts in place of each attention's core
(`bigtrain.models.attention.AttentionCore`), so that the model files stay as they are.

    ContextSelfAttention   softmax(q kᵀ · s + mask) v over the whole sequence while q, k, v hold this rank's
                           S/C tokens: ring attention (`ring.py`) or DeepSpeed-Ulysses (`ulysses.py`), with the
                           mask built from every rank's global positions, documents and padding (`Tokens`, set per
                           micro-batch by `inputs.ContextInputs.split`); the mask the layer built from its shard
                           is not used
    ContextCrossAttention  an encoder-decoder's cross-attention: the decoder's S_d/C queries attend to every
                           encoder token, so K and V are all-gathered over the context group (backward: the
                           reduce-scatter that sums each rank's share of their gradient) and the encoder's
                           padding mask is that of all ranks, in the same rank-major order (attention does not
                           depend on the order of its keys)

T5's relative position bias (`ContextRelativeBias`, in place of a stack's table) gives the self-attention cores
the bias of the whole sequence over global positions; ring and Ulysses add their parts of it.

Both run the plain core on their inputs when no context-parallel micro-batch is being run (sampling, generation:
each rank then computes its full sequence alone, with whole weights). Attention dropout and attention maps are
refused at config load (`bigtrain.config.context_checks`): the ring has no dropout stream; attention maps
are drawn outside a training micro-batch, through the plain core.
"""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.models import TransformerLM
from bigtrain.models.attention import Attention, attention_core
from bigtrain.models.layers import RelativePositionBias, relative_bucket
from bigtrain.parallel.collectives import gather_sequence
from bigtrain.parallel.context.inputs import ContextInputs
from bigtrain.parallel.context.ring import ring_attention
from bigtrain.parallel.context.ulysses import ulysses_attention

ALGORITHMS = {"ring": ring_attention, "ulysses": ulysses_attention}


def _eager(fn):
    """`fn` excluded from torch.compile's tracing (run eagerly where a compiled region calls it)."""
    return torch.compiler.disable(fn, recursive=True)


class _ContextCore(nn.Module):
    """A core that reads the current micro-batch's tokens of one stack from the shared `ContextInputs`. Under
    `train.compile` it runs eagerly inside the compiled block (a graph break: its sends and per-micro-batch tokens
    stay out of the graph); the projections, norms and feed-forward around it are compiled."""

    def __call__(self, *args, **kwargs):
        return _eager(super().__call__)(*args, **kwargs)

    def __init__(self, inputs: ContextInputs, stack: str) -> None:
        super().__init__()
        self.inputs, self.stack = inputs, stack

    def _check(self, dropout: float, return_weights: bool, bias: torch.Tensor | None) -> None:
        if dropout > 0 or return_weights or bias is not None:
            raise ValueError("context-parallel attention runs without attention dropout, attention weights or a "
                             "position bias (refused at config load)")


class ContextSelfAttention(_ContextCore):
    """Self-attention over the sequence split across the context group (ring or Ulysses)."""

    def __init__(self, inputs: ContextInputs, stack: str, algorithm: str) -> None:
        super().__init__(inputs, stack)
        self.algorithm = algorithm

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, dropout: float, return_weights: bool, scale: float | None = None,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.inputs.active:
            return attention_core(q, k, v, mask, causal, dropout, return_weights, scale, bias)
        self._check(dropout, return_weights, None)
        attend = ALGORITHMS[self.algorithm]  # a bias here is `ContextRelativeBias`'s, of the whole sequence
        return attend(q, k, v, self.inputs.of(self.stack), self.inputs.group, causal, scale, bias), None

    def extra_repr(self) -> str:
        return f"{self.algorithm} over {self.inputs.size} context ranks, {self.stack} tokens"


class ContextCrossAttention(_ContextCore):
    """Cross-attention of this rank's decoder tokens to every encoder token (K/V all-gathered)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, dropout: float, return_weights: bool, scale: float | None = None,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.inputs.active:
            return attention_core(q, k, v, mask, causal, dropout, return_weights, scale, bias)
        self._check(dropout, return_weights, bias)
        group = self.inputs.group
        k, v = gather_sequence(k, group, dim=2), gather_sequence(v, group, dim=2)
        padding = [t.key_padding for t in self.inputs.of(self.stack)]
        full = None if padding[0] is None else torch.cat(padding, dim=1)[:, None, None, :]
        return attention_core(q, k, v, full, False, 0.0, False, scale, None)

    def extra_repr(self) -> str:
        return f"keys and values gathered over {self.inputs.size} context ranks"


class ContextRelativeBias(RelativePositionBias):
    """T5's relative position bias of the whole sequence while a context-parallel micro-batch runs: [1, H, S, S]
    over every rank's global positions in rank-major order (the order ring and Ulysses address it in), from the
    same table (its gradient flows through the lookup as on one device). Outside a micro-batch, the layer's own
    bias. It holds S² entries per head on every rank, as one device does: it does not shrink with C."""

    def __init__(self, bias: RelativePositionBias, inputs: ContextInputs, stack: str) -> None:
        nn.Module.__init__(self)
        self.buckets, self.max_distance, self.bidirectional = bias.buckets, bias.max_distance, bias.bidirectional
        self.table = bias.table
        self.inputs, self.stack = inputs, stack

    def forward(self, query_len: int, key_len: int) -> torch.Tensor:
        if not self.inputs.active:
            return super().forward(query_len, key_len)
        positions = torch.cat([t.positions for t in self.inputs.of(self.stack)])
        distance = positions[None, :] - positions[:, None]
        bucket = relative_bucket(distance, self.bidirectional, self.buckets, self.max_distance)
        return self.table(bucket).permute(2, 0, 1).unsqueeze(0)


def apply_context_parallel(model: TransformerLM, inputs: ContextInputs, algorithm: str) -> None:
    """Replace the core of every attention of `model` by its context-parallel form over `inputs.group`: the
    self-attention of a decoder-only / encoder-only stack reads the "self" tokens, an encoder-decoder's encoder
    the "encoder" tokens, its decoder the "decoder" tokens, and its cross-attention the encoder's. A relative
    position bias table of a stack becomes `ContextRelativeBias` of the same stack."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"parallel.context_attention={algorithm!r}; known: {sorted(ALGORITHMS)}")
    stacks = model.stacks()
    names = ["self"] if len(stacks) == 1 else ["encoder", "decoder"]
    tables = ["position_bias"] if len(stacks) == 1 else ["encoder_position_bias", "decoder_position_bias"]
    for name, table in zip(names, tables, strict=True):
        bias = getattr(model, table, None)
        if isinstance(bias, RelativePositionBias):
            setattr(model, table, ContextRelativeBias(bias, inputs, name))
    for name, stack in zip(names, stacks, strict=True):
        for block in stack:
            block.self_attn.core = ContextSelfAttention(inputs, name, algorithm)
            cross = getattr(block, "cross_attn", None)
            if isinstance(cross, Attention):
                cross.core = ContextCrossAttention(inputs, "encoder")
