"""Input embedding: token lookup, scaled by sqrt(d_model) as in the guide, plus absolute positions."""

from __future__ import annotations

import math

import torch
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.models.layers import sinusoidal_table


class Embedding(nn.Module):
    """x = dropout(E[ids] * s + P[positions]), s = sqrt(d_model) if scale_embeddings else 1.

    P is the guide's sinusoidal table (a buffer), a learned table, or nothing (rotary / none).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.kind, self.max_seq_len, self.d_model = cfg.positions, cfg.max_seq_len, cfg.d_model
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.register_buffer("table", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.dropout = nn.Dropout(cfg.dropout)

    def reset_buffers(self) -> None:
        if self.kind == "sinusoidal":
            device = self.table.device if self.table.device.type != "meta" else None
            self.table = sinusoidal_table(self.max_seq_len, self.d_model).to(device)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        seq = ids.shape[-1]
        if offset + seq > self.max_seq_len:
            raise ValueError(f"sequence of {offset + seq} tokens exceeds model.max_seq_len={self.max_seq_len}")
        x = self.tokens(ids) * self.scale
        if self.positions is not None:
            x = x + self.positions.weight[offset:offset + seq]
        elif self.kind == "sinusoidal":
            x = x + self.table[offset:offset + seq].to(x.dtype)
        return self.dropout(x)
