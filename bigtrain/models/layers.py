"""Small building blocks: normalization, position encodings and the position-wise feed-forward network."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019); no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, normalized in fp32."""
    x32 = x.float()  # one fp32 copy for both uses (a 16-bit input would otherwise keep two for backward)
    scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * scale).type_as(x) * weight


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """LayerNorm (y = (x - mean) / sqrt(var + eps) * w + b) or RMSNorm."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def sinusoidal_table(seq_len: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. 2017's table: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d))."""
    position = torch.arange(seq_len, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    table = torch.zeros(seq_len, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), rotating pairs (x_i, x_{i+d/2}) of each head by pos * θ_i.

    θ_i = theta^(-2i/d) for i < d/2; q and k are rotated, v is not, so q·k depends on relative position.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        device = self.cos.device if self.cos.device.type != "meta" else None
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().to(device)
        self.sin = angles.sin().to(device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [batch, heads, seq, head_dim] -> same shape, rotated by its positions: position_ids [batch, seq]
        (incremental decoding, left-padded rows), or 0..seq-1."""
        if position_ids is None:
            seq = x.shape[-2]
            cos, sin = self.cos[:seq], self.sin[:seq]
        else:
            cos, sin = self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def relative_bucket(distance: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each distance = key position - query position (Raffel et al. 2020, §2.1).

    Bidirectional: half the buckets for keys after the query, half for keys at or before it; causal: all
    buckets for keys at or before it (later keys fall in bucket 0, and are masked anyway). Within a direction
    of n buckets, distances below n/2 get a bucket each; larger ones are spaced logarithmically up to
    max_distance: n/2 + floor(log(d / (n/2)) / log(max_distance / (n/2)) * n/2), at most n - 1.
    """
    n = buckets
    if bidirectional:
        n //= 2
        first = (distance > 0).long() * n
        d = distance.abs()
    else:
        first = torch.zeros_like(distance)
        d = (-distance).clamp(min=0)
    exact = n // 2
    logarithmic = exact + (torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                           * (n - exact)).long()
    return first + torch.where(d < exact, d, logarithmic.clamp(max=n - 1))


class RelativePositionBias(nn.Module):
    """A learned scalar per (distance bucket, head) added to the attention scores (T5); one table per stack,
    shared by its blocks. `table` is [buckets, heads], so tensor parallelism cuts it by heads (columns)."""

    def __init__(self, n_heads: int, buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.buckets, self.max_distance, self.bidirectional = buckets, max_distance, bidirectional
        self.table = nn.Embedding(buckets, n_heads)

    def forward(self, query_len: int, key_len: int) -> torch.Tensor:
        """The bias [1, heads, query_len, key_len] of the last `query_len` of `key_len` positions."""
        device = self.table.weight.device
        queries = torch.arange(key_len - query_len, key_len, device=device)[:, None]
        distance = torch.arange(key_len, device=device)[None, :] - queries
        bucket = relative_bucket(distance, self.bidirectional, self.buckets, self.max_distance)
        return self.table(bucket).permute(2, 0, 1).unsqueeze(0)

    def extra_repr(self) -> str:
        kind = "bidirectional" if self.bidirectional else "causal"
        return f"{kind}, max_distance={self.max_distance}"


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's 0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))
}


class FeedForward(nn.Module):
    """Position-wise FFN: down(dropout(act(up(x)))); SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool, dropout: float) -> None:
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if activation == "swiglu" else None
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            hidden = F.silu(self.gate(x)) * self.up(x)
        else:
            hidden = ACTIVATIONS[self.activation](self.up(x))
        return self.down(self.dropout(hidden) if self.dropout.p > 0 else hidden)


class HeadTransform(nn.Module):
    """h -> norm(act(h Wᵀ + b)) before the output head (BERT's masked-LM head transform)."""

    def __init__(self, d_model: int, activation: str, norm: str, eps: float, bias: bool) -> None:
        super().__init__()
        self.activation = activation
        self.dense = nn.Linear(d_model, d_model, bias=bias)
        self.norm = make_norm(norm, d_model, eps, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(ACTIVATIONS[self.activation](self.dense(x)))


class LogitBias(nn.Module):
    """logits + b, one bias per vocabulary entry (BERT's output bias; kept apart from a tied head's weight)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias
