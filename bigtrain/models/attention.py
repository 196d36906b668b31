"""Multi-head and grouped-query attention.

softmax(Q Kᵀ · s + B + mask) V per head, then the output projection; s = 1/sqrt(d_k) (T5: 1) and B an optional
position bias (T5's relative one). Q, K and V come from one linear, `qkv_proj`, whose rows are blocked by key/value
head (`bigtrain.models.qkv`): self-attention runs one matrix product (and one bias reduction) for all three, and
tensor parallelism splits it by heads as a plain column-parallel linear (rows), the output projection by rows of
its input, without touching this file: the head count is read from the projected width at run time.
Cross-attention takes Q from the decoder's rows of the weight and K, V from the encoder's memory. With a cache
(`bigtrain.models.cache`) the layer takes only the new positions and attends over the cached keys as well.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.compat.torch import sdpa
from bigtrain.models.cache import AttentionCache
from bigtrain.models.documents import same_document
from bigtrain.models.layers import Rotary
from bigtrain.models.qkv import join_state


def build_mask(query_len: int, key_padding: torch.Tensor | None, causal: bool,
               device: torch.device, self_attention: bool = True, key_len: int | None = None,
               document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask [batch or 1, 1, query, key], True where attention is allowed; None = no mask needed (or,
    when `causal`, the plain causal one of equal lengths).

    The queries are the last `query_len` of the `key_len` key positions (incremental decoding attends over
    cached keys too). Padding keys are excluded. In self-attention a query may always attend to its own
    position, so that rows of padded queries are never fully masked (which would give NaN); unpadded rows
    are unaffected by this. Not in cross-attention: there query t and key t are different sequences, and a
    real decoder query must not see a padded encoder position just because the two lengths happen to be equal.
    `document_ids` [B, T] (self-attention over a packed block, no cache) also keep each query inside its own
    document (`bigtrain.models.documents`).
    """
    key_len = key_padding.shape[-1] if key_padding is not None else (key_len or query_len)
    shift = key_len - query_len
    if document_ids is not None and (shift != 0 or not self_attention):
        raise ValueError("document_ids mask self-attention over one packed block (no cache, no memory)")
    if key_padding is None and document_ids is None and (not causal or shift == 0):
        return None
    if key_padding is None:
        mask = torch.ones(1, 1, 1, key_len, dtype=torch.bool, device=device)
    else:
        mask = key_padding[:, None, None, :].bool()
    if causal:
        mask = mask & torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(diagonal=shift)
    if document_ids is not None:
        mask = mask & same_document(document_ids)
    if self_attention and key_padding is not None and shift >= 0:
        own = torch.arange(key_len, device=device)[None, :] == torch.arange(query_len, device=device)[:, None] + shift
        mask = mask | own
    return mask


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   causal: bool, dropout: float, return_weights: bool, scale: float | None = None,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: [B, H, T, d], k/v: [B, H_kv, S, d] with H a multiple of H_kv -> ([B, H, T, d], weights or None).

    mask None with `causal` means the plain causal mask (T = S); scale None means 1/√d; bias [1 or B, H, T, S]
    is added to the scores."""
    groups = q.shape[1] // k.shape[1]
    if bias is not None and mask is None and causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if not return_weights:
        attn = mask
        if bias is not None:
            attn = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        return sdpa(q, k, v, attn, dropout, is_causal=causal and mask is None, scale=scale), None
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if mask is None and causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return F.dropout(weights, dropout) @ v, weights


class AttentionCore(nn.Module):
    """softmax(Q Kᵀ · s + B + mask) V as a module of its own (no parameters), so that it can be recomputed
    (selective activation checkpointing wraps it) or given a per-rank dropout stream (tensor parallelism)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool, dropout: float, return_weights: bool, scale: float | None = None,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attention_core(q, k, v, mask, causal, dropout, return_weights, scale, bias)


def _join_separate_qkv(module: Attention, state: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    """A state dict of an earlier bigtrain (Q, K, V as `q_proj`, `k_proj`, `v_proj`; a tensor-parallel rank's
    shards too) loads into the one `qkv_proj`: its tensors joined in place, in the projection's row layout."""
    names = [name for name in state if name.startswith(prefix)]
    if f"{prefix}q_proj.weight" in names:
        joined = join_state({name: state.pop(name) for name in names}, module.head_dim, module.groups)
        state.update(joined)


class Attention(nn.Module):
    """Self- or cross-attention with n_heads query heads and n_kv_heads key/value heads; `scale` False leaves
    the scores unscaled (T5)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool, dropout: float,
                 causal: bool, rotary: Rotary | None = None, scale: bool = True) -> None:
        super().__init__()
        self.head_dim, self.groups = d_model // n_heads, n_heads // n_kv_heads
        self.causal, self.dropout, self.rotary = causal, dropout, rotary
        self.scale = None if scale else 1.0
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.core = AttentionCore()
        self.record_weights = False  # set by `bigtrain.models.inspect.attention_maps`
        self.weights: torch.Tensor | None = None
        self.register_load_state_dict_pre_hook(_join_separate_qkv)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, (H + 2·H_kv)·d_h] in the blocked layout -> Q [B, H, T, d_h], K and V [B, H_kv, T, d_h] (views,
        but for Q when a key/value head serves several query heads)."""
        batch, seq, _ = qkv.shape
        d = self.head_dim
        q, k, v = qkv.view(batch, seq, -1, (self.groups + 2) * d).split([self.groups * d, d, d], dim=-1)
        q = q.reshape(batch, seq, -1, d) if self.groups > 1 else q
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _cross_projections(self, x: torch.Tensor, memory: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Q of the decoder's x, K and V of the encoder's memory (None: Q only, the keys are cached): the weight's
        Q rows and K/V rows apart."""
        d, groups = self.head_dim, self.groups
        weight = self.qkv_proj.weight.view(-1, (groups + 2) * d, self.qkv_proj.in_features)
        bias = self.qkv_proj.bias
        blocks = None if bias is None else bias.view(-1, (groups + 2) * d)

        def part(rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
            return (weight[:, rows].reshape(-1, weight.shape[-1]),
                    None if blocks is None else blocks[:, rows].reshape(-1))

        q = F.linear(x, *part(slice(0, groups * d)))
        batch, seq, _ = q.shape
        q = q.view(batch, seq, -1, d).transpose(1, 2)
        if memory is None:
            return q, None, None
        kv = F.linear(memory, *part(slice(groups * d, None)))
        k, v = kv.view(batch, memory.shape[1], -1, 2 * d).split([d, d], dim=-1)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, position_bias: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: AttentionCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d]; memory: [B, S, d] for cross-attention (keys/values), else keys come from x.

        key_padding: bool [B, S], True at real (non-padding) key positions (with a cache: all of them);
        position_bias: [1 or B, H, T, S] added to the scores; position_ids: [B, T] positions of x for rotary
        (default 0..T-1); cache: this layer's keys and values of earlier steps; document_ids: [B, T] the
        document of each token of a packed block (attention stays inside a document).
        """
        if memory is None:  # self-attention: Q, K and V in one matrix product
            q, k, v = self._split_heads(self.qkv_proj(x))
        else:
            q, k, v = self._cross_projections(x, None if cache is not None and cache.filled else memory)
        if self.rotary is not None:
            q = self.rotary(q, position_ids)
        if cache is not None and cache.filled:  # cross-attention: the encoder's keys, computed at step one
            k, v = cache.stored()
        else:
            if self.rotary is not None:
                k = self.rotary(k, position_ids)
            if cache is not None:
                k, v = cache.add(k, v)
        mask = build_mask(x.shape[1], key_padding, self.causal, x.device, self_attention=memory is None,
                          key_len=k.shape[2], document_ids=document_ids)
        dropout = self.dropout if self.training else 0.0
        out, weights = self.core(q, k, v, mask, self.causal, dropout, self.record_weights, self.scale,
                                 position_bias)
        self.weights = weights
        return self.o_proj(out.transpose(1, 2).flatten(2))
