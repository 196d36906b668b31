"""Multi-head and grouped-query attention.

softmax(Q Kᵀ / sqrt(d_k) + mask) V per head, then the output projection. Q, K, V and the output are
separate linears so that tensor parallelism can split them by heads (columns of Q/K/V, rows of the
output) without touching this file: the head count is read from the projected width at run time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.compat.torch import sdpa
from bigtrain.models.layers import Rotary


def build_mask(query_len: int, key_padding: torch.Tensor | None, causal: bool,
               device: torch.device, self_attention: bool = True) -> torch.Tensor | None:
    """Boolean mask [batch or 1, 1, query, key], True where attention is allowed; None = no mask needed.

    Padding keys are excluded. In self-attention a query may always attend to its own position, so that
    rows of padded queries are never fully masked (which would give NaN); unpadded rows are unaffected by
    this. Not in cross-attention: there query t and key t are different sequences, and a real decoder
    query must not see a padded encoder position just because the two lengths happen to be equal.
    """
    if key_padding is None:
        return None
    key_len = key_padding.shape[-1]
    mask = key_padding[:, None, None, :].bool()
    if causal:
        mask = mask & torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()
    if self_attention and query_len == key_len:
        mask = mask | torch.eye(query_len, dtype=torch.bool, device=device)
    return mask


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   causal: bool, dropout: float, return_weights: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: [B, H, T, d], k/v: [B, H_kv, S, d] with H a multiple of H_kv -> ([B, H, T, d], weights or None)."""
    groups = q.shape[1] // k.shape[1]
    if not return_weights:
        return sdpa(q, k, v, mask, dropout, is_causal=causal and mask is None), None
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is None and causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return F.dropout(weights, dropout) @ v, weights


class AttentionCore(nn.Module):
    """softmax(Q Kᵀ / √d + mask) V as a module of its own (no parameters), so that it can be recomputed
    (selective activation checkpointing wraps it) or given a per-rank dropout stream (tensor parallelism)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, dropout: float, return_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attention_core(q, k, v, mask, causal, dropout, return_weights)


class Attention(nn.Module):
    """Self- or cross-attention with n_heads query heads and n_kv_heads key/value heads."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool, dropout: float,
                 causal: bool, rotary: Rotary | None = None) -> None:
        super().__init__()
        self.head_dim = d_model // n_heads
        self.causal, self.dropout, self.rotary = causal, dropout, rotary
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.core = AttentionCore()
        self.record_weights = False  # set by `bigtrain.models.inspect.attention_maps`
        self.weights: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None,
                memory: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d]; memory: [B, S, d] for cross-attention (keys/values), else keys come from x.

        key_padding: bool [B, S], True at real (non-padding) key positions.
        """
        source = x if memory is None else memory
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(source)), self._heads(self.v_proj(source))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        mask = build_mask(x.shape[1], key_padding, self.causal, x.device, self_attention=memory is None)
        dropout = self.dropout if self.training else 0.0
        out, weights = self.core(q, k, v, mask, self.causal, dropout, self.record_weights)
        self.weights = weights
        return self.o_proj(out.transpose(1, 2).flatten(2))
