"""The reference of bench/model_speed.py: a minimal decoder-only GPT written for this benchmark, the shape a lean
single-file implementation has, with no option it does not need.

    x = E[ids] + P[0..T-1]
    per block:  x = x + W_o · attn(split(W_qkv · N₁(x)))         one fused QKV projection, SDPA (causal)
                x = x + W_down · act(W_up · N₂(x))               N: LayerNorm or RMSNorm, as the config
    logits = N_f(x) · Eᵀ                                         head tied to the token embedding

It covers the bigtrain configurations a plain GPT has (pre-norm LayerNorm or RMSNorm, torch's own modules; learned or
no positions, unscaled
embeddings, GELU / tanh-GELU / ReLU, dropout 0, multi-head attention, tied head); `unsupported` names what else a
config asks for. `load_from` copies a bigtrain model's weights (Q, K and V rows reordered into [Q; K; V]), so
both models compute the same function from the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.models.qkv import split_qkv

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def unsupported(cfg: ModelConfig) -> list[str]:
    """The settings of `cfg` the reference GPT cannot reproduce, as `key=value (allowed)` strings."""
    checks = [
        ("family", cfg.family, cfg.family == "causal", "causal"),
        ("norm_position", cfg.norm_position, cfg.norm_position == "pre", "pre"),
        ("norm", cfg.norm, cfg.norm in ("layernorm", "rmsnorm"), "layernorm or rmsnorm"),
        ("positions", cfg.positions, cfg.positions in ("learned", "none"), "learned or none"),
        ("activation", cfg.activation, cfg.activation in ACTIVATIONS, " / ".join(ACTIVATIONS)),
        ("dropout", cfg.dropout, cfg.dropout == 0 and not cfg.attention_dropout, "0"),
        ("n_kv_heads", cfg.n_kv_heads, cfg.n_kv_heads in (None, cfg.n_heads), "null or n_heads"),
        ("tie_embeddings", cfg.tie_embeddings, cfg.tie_embeddings, "true"),
        ("scale_embeddings", cfg.scale_embeddings, not cfg.scale_embeddings, "false"),
        ("scale_attention", cfg.scale_attention, cfg.scale_attention, "true"),
        ("embedding_norm", cfg.embedding_norm, not cfg.embedding_norm, "false"),
        ("type_vocab_size", cfg.type_vocab_size, cfg.type_vocab_size == 0, "0"),
        ("head_transform", cfg.head_transform, not cfg.head_transform, "false"),
        ("head_bias", cfg.head_bias, not cfg.head_bias, "false"),
        ("scale_tied_output", cfg.scale_tied_output, not cfg.scale_tied_output, "false"),
    ]
    return [f"model.{key}={value} (allowed: {allowed})" for key, value, ok, allowed in checks if not ok]


def norm(kind: str, d_model: int, eps: float, bias: bool) -> nn.Module:
    """torch's own LayerNorm or RMSNorm (x / sqrt(mean(x²) + eps) · w)."""
    return nn.RMSNorm(d_model, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(d_model, eps=eps, bias=bias)


class ReferenceBlock(nn.Module):
    """One pre-norm block with a fused QKV projection."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, activation: str, bias: bool, eps: float,
                 kind: str = "layernorm") -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = norm(kind, d_model, eps, bias)
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.ln_2 = norm(kind, d_model, eps, bias)
        self.c_fc = nn.Linear(d_model, d_ff, bias=bias)
        self.mlp_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(batch, seq, width))
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    """Token + learned position embedding, `n_layers` blocks, final norm, tied head."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        problems = unsupported(cfg)
        if problems:
            raise ValueError("the reference GPT cannot reproduce " + ", ".join(problems))
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(ReferenceBlock(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.activation, cfg.bias,
                                                   cfg.norm_eps, cfg.norm) for _ in range(cfg.n_layers))
        self.ln_f = norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, T] -> logits [B, T, vocab]."""
        x = self.wte(ids)
        if self.wpe is not None:
            x = x + self.wpe.weight[:ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)

    @torch.no_grad()
    def load_from(self, model: nn.Module) -> None:
        """Copy the weights of bigtrain's CausalLM `model` (same config): its Q/K/V rows as [Q; K; V] in c_attn."""
        def copy(dst: nn.Module, src: nn.Module) -> None:
            dst.weight.copy_(src.weight)
            if getattr(dst, "bias", None) is not None:
                dst.bias.copy_(src.bias)

        self.wte.weight.copy_(model.embed.tokens.weight)
        if self.wpe is not None:
            self.wpe.weight.copy_(model.embed.positions.weight)
        for ref, block in zip(self.blocks, model.blocks, strict=True):
            attn = block.self_attn
            ref.c_attn.weight.copy_(torch.cat(split_qkv(attn.qkv_proj.weight, attn.head_dim, attn.groups)))
            if ref.c_attn.bias is not None:
                ref.c_attn.bias.copy_(torch.cat(split_qkv(attn.qkv_proj.bias, attn.head_dim, attn.groups)))
            copy(ref.c_proj, attn.o_proj)
            copy(ref.ln_1, block.self_attn_norm)
            copy(ref.ln_2, block.ffn_norm)
            copy(ref.c_fc, block.ffn.up)
            copy(ref.mlp_proj, block.ffn.down)
        copy(self.ln_f, model.final_norm)
