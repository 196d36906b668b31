"""Keys and values kept between the steps of incremental decoding (generation with a KV cache).

Step t feeds only the new token(s); each self-attention layer appends their keys and values (rotated to
their positions) to what it holds and attends over all of it; cross-attention computes the encoder's keys and
values once. Beam search reorders the rows (`reorder`) when beams are re-ranked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class AttentionCache:
    """One attention layer's keys and values [batch, kv_heads, length, head_dim]; `static` (cross-attention):
    set once, then reused. Self-attention buffers grow by doubling, so appending is amortized O(new tokens)."""

    def __init__(self, static: bool = False) -> None:
        self.static = static
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    @property
    def filled(self) -> bool:
        return self.static and self._k is not None

    def add(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (self-attention) or set (cross-attention) and return all keys and values so far."""
        if self.static:
            self._k, self._v, self.length = k, v, k.shape[2]
            return k, v
        new = k.shape[2]
        if self._k is None or self.length + new > self._k.shape[2]:
            capacity = max(2 * (self._k.shape[2] if self._k is not None else 0), self.length + new, 16)
            grown_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if self._k is not None:
                grown_k[:, :, :self.length] = self._k[:, :, :self.length]
                grown_v[:, :, :self.length] = self._v[:, :, :self.length]
            self._k, self._v = grown_k, grown_v
        self._k[:, :, self.length:self.length + new] = k
        self._v[:, :, self.length:self.length + new] = v
        self.length += new
        return self._k[:, :, :self.length], self._v[:, :, :self.length]

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        return self._k[:, :, :self.length], self._v[:, :, :self.length]

    def reorder(self, rows: torch.Tensor) -> None:
        if self._k is not None:
            self._k, self._v = self._k.index_select(0, rows), self._v.index_select(0, rows)


@dataclass
class BlockCache:
    self_attn: AttentionCache
    cross_attn: AttentionCache | None = None


class DecodingCache:
    """The caches of one decoder stack (a causal model's blocks, or a seq2seq model's decoder blocks) and how
    many positions they hold."""

    def __init__(self, blocks: nn.ModuleList, cross_attention: bool = False) -> None:
        self.blocks = [BlockCache(AttentionCache(), AttentionCache(static=True) if cross_attention else None)
                       for _ in blocks]
        self.length = 0

    def __getitem__(self, index: int) -> BlockCache:
        return self.blocks[index]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row rows[i] as row i (beam search)."""
        for block in self.blocks:
            block.self_attn.reorder(rows)
            if block.cross_attn is not None:
                block.cross_attn.reorder(rows)
