"""The row layout of attention's one Q/K/V projection (`Attention.qkv_proj`), and its parts.

With H query heads, H_kv key/value heads, G = H / H_kv query heads per key/value head and head size d_h, the
projection's weight has (H + 2·H_kv)·d_h rows, one block per key/value head g:

    [ Q heads g·G … g·G + G - 1  (G·d_h rows) ;  K head g (d_h rows) ;  V head g (d_h rows) ]

(plain multi-head attention, G = 1: [q_h; k_h; v_h] per head). A self-attention layer therefore runs one matrix
product for Q, K and V, and a tensor-parallel split by heads (rank r: key/value heads [r·H_kv/T, (r+1)·H_kv/T)
and their query heads) is one contiguous chunk of rows, as for any column-parallel linear. The bias follows the
rows. `join_qkv` builds that layout from separate Q, K, V tensors (initialization per part, checkpoints written
before the projection was one parameter, Hugging Face weights); `split_qkv` takes it apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from bigtrain.config import ModelConfig

T = TypeVar("T")
QKV_PARTS = ("q_proj", "k_proj", "v_proj")  # the parts' names (the separate linears of earlier bigtrains)


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, groups: int) -> torch.Tensor:
    """[H·d_h, …], [H_kv·d_h, …], [H_kv·d_h, …] (rows by head) -> [(H + 2·H_kv)·d_h, …] in the blocked layout."""
    rest = q.shape[1:]
    kv_heads = k.shape[0] // head_dim
    if q.shape[0] != kv_heads * groups * head_dim or v.shape[0] != k.shape[0]:
        raise ValueError(f"Q, K, V of {q.shape[0]}, {k.shape[0]}, {v.shape[0]} rows do not make {groups} query "
                         f"heads of size {head_dim} per key/value head")
    blocks = (q.reshape(kv_heads, groups * head_dim, *rest), k.reshape(kv_heads, head_dim, *rest),
              v.reshape(kv_heads, head_dim, *rest))
    return torch.cat(blocks, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, head_dim: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `join_qkv`: the blocked [(H + 2·H_kv)·d_h, …] -> (Q, K, V) with rows by head."""
    rest = qkv.shape[1:]
    blocks = qkv.reshape(-1, (groups + 2) * head_dim, *rest)
    q, k, v = blocks.split([groups * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous()


def qkv_layout(cfg: ModelConfig) -> tuple[int, int]:
    """(head size d_h, query heads per key/value head G) of `cfg`'s attention layers."""
    return cfg.d_model // cfg.n_heads, cfg.n_heads // (cfg.n_kv_heads or cfg.n_heads)


def separate_prefixes(names: Iterable[str]) -> list[str]:
    """The attention layers (`….self_attn.`) whose Q, K, V are stored as three tensors (`q_proj`, `k_proj`,
    `v_proj`: checkpoints and state dicts of earlier bigtrains, Hugging Face rules), in order."""
    names = set(names)
    return [n[:-len("q_proj.weight")] for n in sorted(names) if ("." + n).endswith(".q_proj.weight")
            and {n.replace(".q_proj.", f".{p}.") for p in QKV_PARTS} <= names]


def join_state(state: dict[str, T], head_dim: int, groups: int,
               join: Callable[[T, T, T], T] | None = None) -> dict[str, T]:
    """`state` with each layer's q_proj / k_proj / v_proj weight and bias replaced by the one `qkv_proj` tensor
    (at the Q tensor's place); `join` combines three values (default `join_qkv`; e.g. optimizer moments)."""
    join = join or (lambda q, k, v: join_qkv(q, k, v, head_dim, groups))
    parts = {f"{prefix}{part}.{kind}": (f"{prefix}qkv_proj.{kind}", i)
             for prefix in separate_prefixes(state) for kind in ("weight", "bias")
             for i, part in enumerate(QKV_PARTS)}
    out: dict[str, T] = {}
    for name, value in state.items():
        if name not in parts:
            out[name] = value
        elif parts[name][1] == 0:
            joined = parts[name][0]
            out[joined] = join(*(state[n] for n, (j, _) in parts.items() if j == joined))
    return out


def split_state(state: dict[str, torch.Tensor], head_dim: int, groups: int) -> dict[str, torch.Tensor]:
    """The inverse of `join_state`: each `qkv_proj` weight and bias as q_proj / k_proj / v_proj tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        prefix, _, kind = name.rpartition("qkv_proj.")
        if ("." + name).endswith((".qkv_proj.weight", ".qkv_proj.bias")):
            for part, t in zip(QKV_PARTS, split_qkv(value, head_dim, groups), strict=True):
                out[f"{prefix}{part}.{kind}"] = t
        else:
            out[name] = value
    return out
