"""Seq2seq samples: generated string tasks (`reverse`, `sort`) or source/target pairs from a file.

A generated example is a random string of lowercase letters, its length uniform in
[data.task_min_len, data.task_max_len], drawn from train.seed; the target is the string reversed or
sorted. Sample: {"input_ids": source + [eos], "decoder_input_ids": [bos] + target,
"labels": target + [eos]}, each side truncated to data.seq_len tokens.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.utils.data import Dataset

from bigtrain.config.schema import Config
from bigtrain.data.files import read_rows, resolve_files
from bigtrain.data.split import split_sizes
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError

TASKS = ("reverse", "sort")


def generate_task(task: str, n: int, min_len: int, max_len: int, seed: int) -> list[tuple[str, str]]:
    """`n` (source, target) pairs of the generated task, a pure function of the arguments."""
    rng = np.random.default_rng([seed & (2**63 - 1), TASKS.index(task)])
    lengths = rng.integers(min_len, max_len + 1, size=n)
    letters = (rng.integers(0, 26, size=int(lengths.sum())) + ord("a")).astype(np.uint8).tobytes().decode()
    ends = np.cumsum(lengths).tolist()
    sources = [letters[end - length:end] for end, length in zip(ends, lengths.tolist(), strict=True)]
    if task == "reverse":
        return [(s, s[::-1]) for s in sources]
    return [(s, "".join(sorted(s))) for s in sources]


def read_pairs(cfg: Config) -> list[tuple[str, str]]:
    """(source, target) pairs of the JSONL/Parquet file(s) named by data.source."""
    d = cfg.data
    pairs = []
    for path, fmt in resolve_files(d.source, d.format):
        key = "data.source_field / data.target_field"
        for rows in read_rows(path, fmt, [d.source_field, d.target_field], key, d.cache_dir):
            pairs.extend((s, t) for s, t in zip(rows[d.source_field], rows[d.target_field], strict=True)
                         if isinstance(s, str) and isinstance(t, str) and s and t)
    if not pairs:
        raise DataError(
            f"data.source: '{d.source}' holds no non-empty ({d.source_field}, {d.target_field}) pairs. Point "
            f"data.source at a JSONL/Parquet file with those columns, or set data.source_field and "
            f"data.target_field.")
    return pairs


class Seq2SeqPairs(Dataset):
    """Tokenized (source, target) pairs; `lengths` is the longer side of each sample."""

    def __init__(self, sources: list[np.ndarray], targets: list[np.ndarray], tokenizer: Tokenizer) -> None:
        self.sources, self.targets = sources, targets
        self.eos_id, self.bos_id = tokenizer.eos_id, tokenizer.bos_id
        self.lengths = np.array([max(len(s), len(t)) + 1 for s, t in zip(sources, targets, strict=True)],
                                dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = operator.index(index)
        if not 0 <= index < len(self.sources):
            raise IndexError(f"pair {index} out of range [0, {len(self.sources)})")
        src, tgt = self.sources[index], self.targets[index]
        return {"input_ids": _cat(src, [self.eos_id]), "decoder_input_ids": _cat([self.bos_id], tgt),
                "labels": _cat(tgt, [self.eos_id])}


def _cat(a, b) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)]))


def seq2seq_datasets(cfg: Config, tokenizer: Tokenizer) -> tuple[Seq2SeqPairs, Seq2SeqPairs]:
    """(train, held-out) pairs; held-out is the last pairs."""
    d = cfg.data
    if d.source in TASKS:
        pairs = generate_task(d.source, d.task_samples, d.task_min_len, d.task_max_len, cfg.train.seed)
    elif d.source == "embedded":
        raise DataError(
            "data.source: model.family='seq2seq' needs (source, target) pairs, which the embedded corpus does "
            "not have. Set data.source to 'reverse' or 'sort' (generated tasks), or to a JSONL/Parquet file "
            "with data.source_field and data.target_field columns.")
    else:
        pairs = read_pairs(cfg)
    keep = d.seq_len - 1  # room for eos / bos
    sources = [ids[:keep] for ids in tokenizer.encode_arrays([s for s, _ in pairs])]
    targets = [ids[:keep] for ids in tokenizer.encode_arrays([t for _, t in pairs])]
    fix = "Raise data.task_samples, point data.source at more pairs, or lower data.holdout_fraction."
    train, _ = split_sizes(len(pairs), d.holdout_fraction, "seq2seq pairs", fix)
    return (Seq2SeqPairs(sources[:train], targets[:train], tokenizer),
            Seq2SeqPairs(sources[train:], targets[train:], tokenizer))
