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
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, first: int, count: int) -> None:
        self.tokens, self.seq_len, self.first, self.count = tokens, seq_len, first, count
        self.lengths = np.full(count, seq_len, dtype=np.int64)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = operator.index(index)
        if not 0 <= index < self.count:
            raise IndexError(f"block {index} out of range [0, {self.count})")
        start = (self.first + index) * self.seq_len
        x = torch.from_numpy(np.array(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
        return {"input_ids": x[:-1], "labels": x[1:]}


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
    return (CausalBlocks(corpus.tokens, seq_len, 0, train),
            CausalBlocks(corpus.tokens, seq_len, train, heldout))
