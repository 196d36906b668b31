"""Input embedding: token lookup, scaled by sqrt(d_model) as in Vaswani et al. 2017, plus absolute positions, token
types and a norm where the architecture has them (BERT)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.models.layers import make_norm, sinusoidal_table


class Embedding(nn.Module):
    """x = dropout(norm(E[ids] * s + P[positions] + T[token types])), s = sqrt(d_model) if scale_embeddings
    else 1.

    P is Vaswani et al.'s (2017) sinusoidal table (a buffer), a learned table, or nothing (rotary / relative / none); T
    exists with model.type_vocab_size > 0 (token type 0 when none are given); the norm with
    model.embedding_norm.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.kind, self.max_seq_len, self.d_model = cfg.positions, cfg.max_seq_len, cfg.d_model
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.embedding_norm else None
        self.register_buffer("table", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.dropout = nn.Dropout(cfg.dropout)

    def reset_buffers(self) -> None:
        if self.kind == "sinusoidal":
            device = self.table.device if self.table.device.type != "meta" else None
            self.table = sinusoidal_table(self.max_seq_len, self.d_model).to(device)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids: [B, T]; position_ids: [B, T] (default 0..T-1); token_type_ids: [B, T] (default 0)."""
        seq = ids.shape[-1]
        if position_ids is None and seq > self.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds model.max_seq_len={self.max_seq_len}")
        x = self.tokens(ids)
        if self.scale != 1.0:
            x = x * self.scale
        if self.positions is not None:
            x = x + (self.positions.weight[:seq] if position_ids is None else self.positions(position_ids))
        elif self.kind == "sinusoidal":
            x = x + (self.table[:seq] if position_ids is None else self.table[position_ids]).to(x.dtype)
        if self.token_types is not None:
            x = x + (self.token_types.weight[0] if token_type_ids is None else self.token_types(token_type_ids))
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x) if self.dropout.p > 0 else x
