"""One Transformer block: self-attention, optional cross-attention, feed-forward, each wrapped in a residual.

post-norm (Vaswani et al. 2017's Add & Norm): x = norm(x + dropout(sublayer(x)))
pre-norm:                            x = x + dropout(sublayer(norm(x)))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.models.attention import Attention
from bigtrain.models.cache import BlockCache
from bigtrain.models.layers import FeedForward, Rotary, make_norm
from bigtrain.models.moe import MoEFeedForward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    """Encoder block (bidirectional), decoder-only block (causal) or encoder-decoder decoder block (causal +
    cross-attention), chosen by `causal` and `cross_attention`; `moe`: the feed-forward is a mixture of experts
    (`model.moe`, `bigtrain.models.moe`)."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross_attention: bool,
                 rotary: Rotary | None = None, moe: bool = False) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        kv_heads = cfg.n_kv_heads or cfg.n_heads
        attn_dropout = cfg.dropout if cfg.attention_dropout is None else cfg.attention_dropout

        def norm() -> nn.Module:
            return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)

        self.self_attn = Attention(cfg.d_model, cfg.n_heads, kv_heads, cfg.bias, attn_dropout, causal, rotary,
                                   cfg.scale_attention)
        self.self_attn_norm = norm()
        self.cross_attn = self.cross_attn_norm = None
        if cross_attention:
            self.cross_attn = Attention(cfg.d_model, cfg.n_heads, kv_heads, cfg.bias, attn_dropout, False,
                                        scale=cfg.scale_attention)
            self.cross_attn_norm = norm()
        if moe:
            m = cfg.moe
            self.ffn = MoEFeedForward(cfg.d_model, m.d_ff or cfg.d_ff, cfg.activation, cfg.bias, cfg.dropout,
                                      m.experts, m.top_k, m.shared_experts, m.capacity_factor, m.aux_loss_coef,
                                      m.z_loss_coef)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.bias, cfg.dropout)
        self.ffn_norm = norm()
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module,
                  sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        # Dropout with p = 0 is the identity: not called (a module call per sublayer is measurable at small sizes).
        drop = self.dropout if self.dropout.p > 0 else _identity
        if self.pre_norm:
            return x + drop(sublayer(norm(x)))
        return norm(x + drop(sublayer(x)))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_padding_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: BlockCache | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, d]; padding_mask: bool [B, T] (True = real token; with a cache, over all positions so far);
        memory: encoder output [B, S, d]; position_bias: added to the self-attention scores; position_ids:
        positions of x (rotary); cache: this block's keys and values of earlier decoding steps; document_ids:
        [B, T] the document of each token of a packed block (self-attention stays inside a document)."""
        x = self._residual(x, self.self_attn_norm, lambda h: self.self_attn(
            h, key_padding=padding_mask, position_bias=position_bias, position_ids=position_ids,
            cache=None if cache is None else cache.self_attn, document_ids=document_ids))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_attn_norm, lambda h: self.cross_attn(
                h, key_padding=memory_padding_mask, memory=memory,
                cache=None if cache is None else cache.cross_attn))
        return self._residual(x, self.ffn_norm, self.ffn)
