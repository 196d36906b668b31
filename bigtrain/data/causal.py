"""Causal LM samples: fixed-length blocks of the concatenated token stream, shifted by one for labels."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.utils.data import Dataset

from bigtrain.config.schema import Config
from bigtrain.data.corpus import TokenCorpus
from bigtrain.data.split import split_sizes
from bigtrain.errors import DataError


class CausalBlocks(Dataset):
    """Blocks `first .. first+count-1`; block b is tokens[b*L : b*L + L + 1] (L = seq_len).

    Sample: {"input_ids": x[:-1], "labels": x[1:]}; consecutive blocks overlap by one token.

    With `doc_ends` (data.document_masking) the sample also has "document_ids": the document of each input
    token, numbered 0, 1, ... from the block's first token. A document ends with its end-of-document token,
    so the boundary lies after each eos. Labels are unchanged: the target at an eos is the next document's
    first token (as in Megatron-LM and torchtitan), predicted from its own document only.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, first: int, count: int,
                 doc_ends: np.ndarray | None = None) -> None:
        self.tokens, self.seq_len, self.first, self.count = tokens, seq_len, first, count
        self.doc_ends = doc_ends
        self.lengths = np.full(count, seq_len, dtype=np.int64)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = operator.index(index)
        if not 0 <= index < self.count:
            raise IndexError(f"block {index} out of range [0, {self.count})")
        start = (self.first + index) * self.seq_len
        x = torch.from_numpy(np.array(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
        if self.doc_ends is None:
            return {"input_ids": x[:-1], "labels": x[1:]}
        return {"input_ids": x[:-1], "labels": x[1:], "document_ids": self.document_ids(start)}

    def document_ids(self, start: int) -> torch.Tensor:
        """[L] int64: doc(t) - doc(start) for t = start .. start+L-1; doc(t) = #{k: doc_ends[k] <= t}, the
        documents wholly before token t (doc_ends are exclusive)."""
        docs = np.searchsorted(self.doc_ends, np.arange(start, start + self.seq_len), side="right")
        return torch.from_numpy(docs - docs[0])


def causal_datasets(corpus: TokenCorpus, cfg: Config) -> tuple[CausalBlocks, CausalBlocks]:
    """(train, held-out) blocks of the corpus; held-out is the last blocks."""
    seq_len, n_tokens = cfg.data.seq_len, len(corpus.tokens)
    n_blocks = max(0, (n_tokens - 1) // seq_len)
    fix = ("Lower data.seq_len, raise data.max_bytes (embedded corpus) or point data.source at more text.")
    if n_blocks == 0:
        raise DataError(
            f"data.seq_len: the corpus has {n_tokens} tokens, fewer than one block needs (data.seq_len + 1 "
            f"= {seq_len + 1}). {fix}")
    train, heldout = split_sizes(n_blocks, cfg.data.holdout_fraction, f"blocks of data.seq_len={seq_len}",
                                 fix)
    doc_ends = corpus.doc_ends if cfg.data.document_masking else None
    return (CausalBlocks(corpus.tokens, seq_len, 0, train, doc_ends),
            CausalBlocks(corpus.tokens, seq_len, train, heldout, doc_ends))
