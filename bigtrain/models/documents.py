"""Document masking: several documents packed into one block behave as if each ran alone.

A block's `document_ids` [B, T] give the document of each token; a document is a run of equal ids (the data
pipeline numbers them 0, 1, 2, ... within the block). Two things follow from them:

    mask       query i may attend key j  iff  j <= i and doc[i] == doc[j]   (block-diagonal causal)
    positions  p_i = i - s_i, s_i = the first index of i's document          (restart at 0 per document)

With both, every token of a packed document computes what it computes when its document is fed alone (T5's
relative bias needs no change: it depends on j - i only, which restarting positions would leave unchanged).
"""

from __future__ import annotations

import torch


def same_document(document_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: True where query i and key j lie in the same document."""
    return document_ids[:, None, :, None] == document_ids[:, None, None, :]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: each token's position within its document, p_i = i - s_i (s_i = its document's start)."""
    length = document_ids.shape[-1]
    index = torch.arange(length, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return index - torch.where(starts, index, 0).cummax(dim=-1).values
