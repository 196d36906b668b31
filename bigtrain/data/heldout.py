"""The held-out set of an evaluation, counted in sequences: the same samples whatever the layout or the batch split.

    how many      n = train.eval_samples (default 512); a config that still sets train.eval_batches (and not
                  eval_samples) means n = eval_batches × micro_batch_size, the set it evaluated before
    which         one source: held-out samples 0 .. n-1 (all of them when the split is smaller); a mixture
                  (data.sources): source k's first ⌊n/K⌋ held-out samples, one more for the first n mod K sources
                  (fewer where its split is smaller), so every source is evaluated, also one of weight 0
    batched       each source's samples in order, cut into micro-batches of train.micro_batch_size (the last one
                  may be shorter); batches never mix sources, so each source's sums are its own

Every rank builds all of them (ZeRO-3 needs every rank in each forward). `eval_loss` is Σ token losses / Σ target
tokens over the whole set (`bigtrain.engine.evaluate`), so the split into micro-batches changes only the order
of the summation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bigtrain.config import Config, TrainConfig
from bigtrain.data.collate import collate
from bigtrain.data.tokenizer import Tokenizer

DEFAULT_EVAL_SAMPLES = 512

Batch = dict[str, torch.Tensor]


@dataclass
class HeldOutPart:
    """One source's part of the held-out set: its name (None for a single source), sample indices, batches."""

    name: str | None
    indices: list[int]
    batches: list[Batch] = field(default_factory=list)


def eval_sample_count(t: TrainConfig) -> int:
    """Held-out sequences per evaluation (module docstring)."""
    if t.eval_samples is not None:
        return t.eval_samples
    if t.eval_batches is not None:
        return t.eval_batches * t.micro_batch_size
    return DEFAULT_EVAL_SAMPLES


def eval_size_note(t: TrainConfig) -> str | None:
    """What the console says when a config still sets train.eval_batches; None when it does not."""
    if t.eval_batches is None:
        return None
    if t.eval_samples is not None:
        return (f"train.eval_batches={t.eval_batches} is ignored: train.eval_samples={t.eval_samples} sets the "
                f"held-out set")
    return (f"train.eval_batches={t.eval_batches} counts micro-batches: the held-out set is {eval_sample_count(t)} "
            f"sequences (x train.micro_batch_size={t.micro_batch_size}), another with another micro-batch size; "
            f"set train.eval_samples={eval_sample_count(t)} instead to keep it under any split")


def heldout_indices(heldout: Any, count: int) -> list[tuple[str | None, list[int]]]:
    """(source name, sample indices) of the held-out set of `count` sequences (module docstring); a dataset with
    `names` and `ends` (a mixture's `Concatenation`) is split by source, parts without samples left out."""
    names = getattr(heldout, "names", None)
    if not names:
        return [(None, list(range(min(count, len(heldout)))))]
    ends = np.asarray(heldout.ends, dtype=np.int64)
    parts = []
    for k, name in enumerate(names):
        start = int(ends[k - 1]) if k else 0
        share = count // len(names) + (k < count % len(names))
        take = min(share, int(ends[k]) - start)
        if take > 0:
            parts.append((name, list(range(start, start + take))))
    return parts


def heldout_parts(cfg: Config, tokenizer: Tokenizer, heldout: Any, device: torch.device,
                  pad_multiple: int = 1) -> list[HeldOutPart]:
    """The held-out set by source, collated into micro-batches of train.micro_batch_size on `device`."""
    size = cfg.train.micro_batch_size
    parts = []
    for name, indices in heldout_indices(heldout, eval_sample_count(cfg.train)):
        batches = [{k: v.to(device) for k, v in collate([heldout[i] for i in indices[s:s + size]], cfg.model.family,
                                                        tokenizer.pad_id, pad_multiple).items()}
                   for s in range(0, len(indices), size)]
        parts.append(HeldOutPart(name, indices, batches))
    return parts
