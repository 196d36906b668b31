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

import torch

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
    """The inverse of `join_qkv`: the blocked [(H + 2·H_kv)·d_h, …] -> (Q, K, V) with rows by head (copies)."""
    rest = qkv.shape[1:]
    blocks = qkv.reshape(-1, (groups + 2) * head_dim, *rest)
    q, k, v = blocks.split([groups * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)
