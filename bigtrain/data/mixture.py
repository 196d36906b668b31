"""A mixture of datasets (`data.sources`), blended deterministically by global sample index.

With weights w_k (normalized), every period of P consecutive sample positions holds q_k samples of source k,
q_k = P·w_k rounded by largest remainder (Σ q_k = P). Inside a period the sources are evenly interleaved:
the m-th sample of source k sits at the rank of (m + ½)/q_k among all sources' slots (ties by source order),
so any window of W consecutive positions holds W·w_k ± 2 samples of source k, not just whole periods.

Position i is the n-th draw from its source k, n = (i // P)·q_k + m; draws go through source k's samples in
epochs, each a permutation of the source drawn from (seed, k, epoch): sample perm_{k,e}[n mod N_k] with
e = n // N_k. Everything is a pure function of (seed, i), so the batches are the same under any layout and a
resumed run reads what an uninterrupted one reads. The stream is endless: `len()` is only the nominal size
(the sources' samples summed) and the sampler walks positions 0, 1, 2, ... in order (`MixtureSampler`).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

PERIOD = 10_000
_MIX = 2  # stream tag of the per-source epoch permutations (the sampler uses 0 and 1)


def quotas(weights: Sequence[float], period: int) -> np.ndarray:
    """q_k: `period` split in proportion to `weights` by largest remainder (ties to the earlier source)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * period
    q = np.floor(exact).astype(np.int64)
    short = period - int(q.sum())
    order = sorted(range(len(w)), key=lambda k: (-(exact[k] - q[k]), k))
    for k in order[:short]:
        q[k] += 1
    return q


def interleave(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, draw within the period) of each position of one period: slot m of source k at key (m+½)/q_k."""
    keys = np.concatenate([(np.arange(n) + 0.5) / n for n in q if n > 0]) if q.sum() else np.zeros(0)
    sources = np.concatenate([np.full(n, k) for k, n in enumerate(q) if n > 0]).astype(np.int64)
    draws = np.concatenate([np.arange(n) for n in q if n > 0]).astype(np.int64)
    order = np.lexsort((sources, keys))
    return sources[order], draws[order]


class Mixture(Dataset):
    """Samples of `datasets` in proportion to `weights`, position by position (module docstring)."""

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], names: Sequence[str], seed: int,
                 period: int = PERIOD) -> None:
        self.datasets, self.names = list(datasets), list(names)
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        self.period, self.seed = period, seed & (2**63 - 1)
        self.q = quotas(weights, period)
        empty = [n for n, q, size in zip(self.names, self.q, self.sizes, strict=True) if q > 0 and size == 0]
        if empty:
            from bigtrain.errors import DataError

            raise DataError(f"data.sources: {empty} hold no training samples (too little text for one sequence "
                            f"after the held-out split) but have a positive weight. Give them more text, or weight 0.")
        self.source_at, self.draw_at = interleave(self.q)
        # draws of source k among the first r positions of a period, r = 0..P
        self.prefix = np.zeros((len(self.q), period + 1), dtype=np.int64)
        for k in range(len(self.q)):
            self.prefix[k, 1:] = np.cumsum(self.source_at == k)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source k, draw n from it) of each position."""
        positions = np.asarray(positions, dtype=np.int64)
        period, offset = np.divmod(positions, self.period)
        sources = self.source_at[offset]
        return sources, period * self.q[sources] + self.draw_at[offset]

    def draws_before(self, position: int) -> np.ndarray:
        """Samples drawn from each source by positions [0, position)."""
        period, offset = divmod(position, self.period)
        return period * self.q + self.prefix[:, offset]

    def epochs_before(self, position: int) -> np.ndarray:
        """Epochs each source has gone through by `position` (fractional: draws / samples)."""
        return self.draws_before(position) / np.maximum(self.sizes, 1)

    def _sample_index(self, k: int, n: int) -> int:
        epoch, j = divmod(n, int(self.sizes[k]))
        key = (k, epoch)
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, _MIX, k, epoch]).permutation(int(self.sizes[k]))
            self._perms[key] = perm
            while len(self._perms) > 2 * len(self.q) + 2:
                self._perms.popitem(last=False)
        return int(perm[j])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = operator.index(index)
        if index < 0:
            raise IndexError(f"mixture position {index} is negative")
        sources, draws = self.locate(np.array([index]))
        k, n = int(sources[0]), int(draws[0])
        return self.datasets[k][self._sample_index(k, n)]

    def lengths_of(self, positions: np.ndarray) -> np.ndarray:
        """Tokens of the samples at `positions` (for length bucketing and per-source token counts)."""
        sources, draws = self.locate(positions)
        out = np.empty(len(sources), dtype=np.int64)
        for i, (k, n) in enumerate(zip(sources.tolist(), draws.tolist(), strict=True)):
            out[i] = self.datasets[k].lengths[self._sample_index(k, n)]
        return out


class Concatenation(Dataset):
    """Datasets one after the other (the held-out splits of a mixture's sources, by source name), with their
    `lengths`; `ends[k]` is the exclusive end of dataset k."""

    def __init__(self, datasets: Sequence[Dataset], names: Sequence[str] | None = None) -> None:
        self.datasets = list(datasets)
        self.names = list(names) if names is not None else None
        self.ends = np.cumsum([len(d) for d in self.datasets])
        self.lengths = np.concatenate([np.asarray(d.lengths) for d in self.datasets]) if self.datasets else []

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"held-out sample {index} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.ends, index, side="right"))
        return self.datasets[k][index - (int(self.ends[k - 1]) if k else 0)]
