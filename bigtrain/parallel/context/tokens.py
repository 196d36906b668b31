"""Which query may attend which key when the two are shards of a context-split sequence.

A set of tokens is described by what the mask needs of it (`Tokens`): the global position of each token
(`sharding.global_positions`), its document (document masking; -1 on padding, as `collate` pads) and whether
it is a real token or padding. For queries q and keys k of the same sequence:

    allowed(q, k) = [causal: pos_k <= pos_q] and [doc_q = doc_k] and [k is real]   or   pos_q = pos_k

which is `bigtrain.models.attention.build_mask` (self-attention) written with global positions instead of
indices, so it holds for any two shards and for any order of the tokens (the zig-zag chunks, the rank-major
order of an all-to-all). The last term lets a query always see itself, so no row is empty (padded rows would
otherwise give NaN); on unpadded rows it changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tokens:
    """positions: int64 [T] global positions; document_ids: int64 [B, T] or None; key_padding: bool [B, T] or
    None (True at real tokens)."""

    positions: torch.Tensor
    document_ids: torch.Tensor | None = None
    key_padding: torch.Tensor | None = None


def allowed(q: Tokens, k: Tokens, causal: bool) -> torch.Tensor | None:
    """bool [B or 1, 1, Tq, Tk], True where query i may attend key j; None when every pair is allowed."""
    if not causal and q.document_ids is None and k.key_padding is None:
        return None
    mask = torch.ones(1, 1, q.positions.numel(), k.positions.numel(), dtype=torch.bool, device=q.positions.device)
    if causal:
        mask = mask & (k.positions[None, :] <= q.positions[:, None])
    if q.document_ids is not None and k.document_ids is not None:
        mask = mask & (q.document_ids[:, None, :, None] == k.document_ids[:, None, None, :])
    if k.key_padding is not None:
        mask = mask & k.key_padding[:, None, None, :].bool()
        mask = mask | (q.positions[:, None] == k.positions[None, :])
    return mask


def concat_tokens(parts: list[Tokens]) -> Tokens:
    """The tokens of several shards one after the other (the rank-major order of a gathered sequence)."""
    docs = [p.document_ids for p in parts]
    pads = [p.key_padding for p in parts]
    return Tokens(torch.cat([p.positions for p in parts]),
                  None if docs[0] is None else torch.cat(docs, dim=1),
                  None if pads[0] is None else torch.cat(pads, dim=1))


def gather_tokens(local: Tokens, group) -> list[Tokens]:
    """Every rank's `Tokens`, by rank of the group (one all-gather per field: integers, a few per token)."""
    import torch.distributed as dist

    size = dist.get_world_size(group=group)

    def gather(t: torch.Tensor | None) -> list[torch.Tensor | None]:
        if t is None:
            return [None] * size
        wide = t.to(torch.int64).contiguous()
        pieces = [torch.empty_like(wide) for _ in range(size)]
        dist.all_gather(pieces, wide, group=group)
        return [p.to(t.dtype) for p in pieces]

    positions, docs, pads = gather(local.positions), gather(local.document_ids), gather(local.key_padding)
    return [Tokens(positions[r], docs[r], pads[r]) for r in range(size)]


def everyone(tokens: Tokens | Sequence[Tokens], group) -> list[Tokens]:
    """Every rank's `Tokens`: gathered from this rank's, or as given when already gathered (`gather_tokens`
    once per batch spares each attention layer its three small all-gathers)."""
    import torch.distributed as dist

    size = dist.get_world_size(group=group)
    if isinstance(tokens, Tokens):
        return gather_tokens(tokens, group) if size > 1 else [tokens]
    if len(tokens) != size:
        raise ValueError(f"{len(tokens)} ranks' tokens given for a context group of {size}")
    return list(tokens)
