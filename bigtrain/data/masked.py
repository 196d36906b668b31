"""Masked LM samples: documents cut into chunks of at most seq_len tokens, masked BERT-style.

Each token is selected with probability data.mask_prob (at least one per sample); a selected token
becomes mask_id 80% of the time, a random non-special token 10%, and stays 10%. Labels hold the
original id at selected positions and -100 elsewhere. The draws depend only on (train.seed, the
sample's index in the whole chunk list), so every run and every parallel layout sees the same masks.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.utils.data import Dataset

from bigtrain.config.schema import Config
from bigtrain.data.corpus import TokenCorpus
from bigtrain.data.split import split_sizes
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError
from bigtrain.models.loss import IGNORE_INDEX

MIN_CHUNK = 8


def chunk_table(doc_ends: np.ndarray, seq_len: int, min_len: int = MIN_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the chunks: each document (eos excluded) cut every seq_len tokens."""
    doc_starts = np.concatenate([[0], doc_ends[:-1]]).astype(np.int64)
    doc_lens = doc_ends - doc_starts - 1
    n_chunks = -(-doc_lens // seq_len)
    first = np.repeat(doc_starts, n_chunks)
    k = np.arange(n_chunks.sum()) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    starts = first + k * seq_len
    lengths = np.minimum(seq_len, np.repeat(doc_starts + doc_lens, n_chunks) - starts)
    keep = lengths >= min_len
    return starts[keep], lengths[keep]


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, mask_prob: float, mask_id: int,
                regular_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of int64 `ids`: (inputs, labels)."""
    n = len(ids)
    selected = rng.random(n) < mask_prob
    if not selected.any():
        selected[rng.integers(n)] = True
    action = rng.random(n)
    inputs = ids.copy()
    inputs[selected & (action < 0.8)] = mask_id
    randomized = selected & (action >= 0.8) & (action < 0.9)
    inputs[randomized] = regular_ids[rng.integers(len(regular_ids), size=int(randomized.sum()))]
    labels = np.where(selected, ids, IGNORE_INDEX)
    return inputs, labels


class MaskedChunks(Dataset):
    """Chunks `first .. first+count-1` of the chunk table, masked on access."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, first: int, count: int,
                 seed: int, mask_prob: float, tokenizer: Tokenizer) -> None:
        self.tokens, self.first, self.count = tokens, first, count
        self.starts = starts[first:first + count]
        self.lengths = lengths[first:first + count]
        self.seed, self.mask_prob, self.mask_id = seed & (2**63 - 1), mask_prob, tokenizer.mask_id
        self.regular_ids = np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.special_ids)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = operator.index(index)
        if not 0 <= index < self.count:
            raise IndexError(f"chunk {index} out of range [0, {self.count})")
        start, length = int(self.starts[index]), int(self.lengths[index])
        ids = np.array(self.tokens[start:start + length], dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.first + index])
        inputs, labels = mask_tokens(ids, rng, self.mask_prob, self.mask_id, self.regular_ids)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


def masked_datasets(corpus: TokenCorpus, cfg: Config, tokenizer: Tokenizer) -> tuple[MaskedChunks, MaskedChunks]:
    """(train, held-out) chunks of the corpus; held-out is the last chunks."""
    d = cfg.data
    starts, lengths = chunk_table(corpus.doc_ends, d.seq_len)
    fix = ("Point data.source at more text, raise data.max_bytes (embedded corpus) or lower "
           "data.holdout_fraction.")
    if len(starts) == 0:
        raise DataError(
            f"data.source: no document has the {MIN_CHUNK} tokens a masked LM sample needs. Point data.source "
            f"at longer documents, or raise data.max_bytes (embedded corpus).")
    train, heldout = split_sizes(len(starts), d.holdout_fraction, "masked LM chunks", fix)
    args = (cfg.train.seed, d.mask_prob, tokenizer)
    return (MaskedChunks(corpus.tokens, starts, lengths, 0, train, *args),
            MaskedChunks(corpus.tokens, starts, lengths, train, heldout, *args))
