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
from bigtrain.parallel.collectives import gather_sequence
from bigtrain.parallel.context.inputs import ContextInputs
from bigtrain.parallel.context.ring import ring_attention
from bigtrain.parallel.context.ulysses import ulysses_attention

ALGORITHMS = {"ring": ring_attention, "ulysses": ulysses_attention}


class _ContextCore(nn.Module):
    """A core that reads the current micro-batch's tokens of one stack from the shared `ContextInputs`."""

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
        self._check(dropout, return_weights, bias)
        attend = ALGORITHMS[self.algorithm]
        return attend(q, k, v, self.inputs.of(self.stack), self.inputs.group, causal, scale), None

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


def apply_context_parallel(model: TransformerLM, inputs: ContextInputs, algorithm: str) -> None:
    """Replace the core of every attention of `model` by its context-parallel form over `inputs.group`: the
    self-attention of a decoder-only / encoder-only stack reads the "self" tokens, an encoder-decoder's encoder
    the "encoder" tokens, its decoder the "decoder" tokens, and its cross-attention the encoder's."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"parallel.context_attention={algorithm!r}; known: {sorted(ALGORITHMS)}")
    stacks = model.stacks()
    names = ["self"] if len(stacks) == 1 else ["encoder", "decoder"]
    for name, stack in zip(names, stacks, strict=True):
        for block in stack:
            block.self_attn.core = ContextSelfAttention(inputs, name, algorithm)
            cross = getattr(block, "cross_attn", None)
            if isinstance(cross, Attention):
                cross.core = ContextCrossAttention(inputs, "encoder")
