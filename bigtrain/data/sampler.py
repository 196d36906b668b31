"""Which samples make up each global batch: a pure function of (seed, step), whatever the layout.

The sample order is an endless run of epochs, each a permutation of range(len(dataset)) drawn from
(seed, epoch); global batch k is positions [k*G, (k+1)*G) of that run, so a batch may span two epochs.
With bucket_size B > 1 (padded families), each window of B*G consecutive positions is sorted by sample
length and cut into B batches, whose order within the window is shuffled by (seed, window): batches
hold similar lengths (little padding) while the window as a whole keeps the shuffled order's samples.
The trainer splits a global batch across data-parallel ranks and micro-batches itself.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from torch.utils.data import Dataset

_EPOCH, _WINDOW = 0, 1  # stream tags, so epoch and window draws never share a seed


class GlobalBatchSampler:
    """Global batch indices by optimizer step; `indices(k)` costs O(G) (O(B*G) once per window)."""

    def __init__(self, dataset: Dataset, global_batch_size: int, seed: int, bucket_size: int = 1) -> None:
        if len(dataset) < 1:
            raise ValueError("GlobalBatchSampler needs a non-empty dataset")
        if global_batch_size < 1 or bucket_size < 1:
            raise ValueError(f"global_batch_size ({global_batch_size}) and bucket_size ({bucket_size}) "
                             f"must be positive")
        self.size, self.batch, self.bucket = len(dataset), global_batch_size, bucket_size
        self.seed = seed & (2**63 - 1)
        self.lengths = np.asarray(dataset.lengths) if bucket_size > 1 else None
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._keep_perms = 2 + global_batch_size * bucket_size // self.size
        self._window: tuple[int, list[np.ndarray]] | None = None

    def indices(self, step: int) -> list[int]:
        """Sample indices of the global batch at 0-based optimizer step `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.bucket == 1:
            return self._positions(step * self.batch, self.batch).tolist()
        window, slot = divmod(step, self.bucket)
        if self._window is None or self._window[0] != window:
            self._window = (window, self._bucketed(window))
        return self._window[1][slot].tolist()

    def _bucketed(self, window: int) -> list[np.ndarray]:
        span = self.batch * self.bucket
        samples = self._positions(window * span, span)
        samples = samples[np.argsort(self._lengths(samples), kind="stable")]
        batches = [samples[i * self.batch:(i + 1) * self.batch] for i in range(self.bucket)]
        order = np.random.default_rng([self.seed, _WINDOW, window]).permutation(self.bucket)
        return [batches[i] for i in order]

    def _lengths(self, samples: np.ndarray) -> np.ndarray:
        return self.lengths[samples]

    def _positions(self, start: int, count: int) -> np.ndarray:
        """Samples at positions [start, start+count) of the endless epoch sequence."""
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.size)
            take = min(count, self.size - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            start, count = start + take, count - take
        return np.concatenate(parts)

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, _EPOCH, epoch]).permutation(self.size)
            self._perms[epoch] = perm
            while len(self._perms) > self._keep_perms:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm


class MixtureSampler(GlobalBatchSampler):
    """Global batches of a `Mixture`: its positions in order (the mixture itself blends its sources and shuffles
    within each), bucketed by length like any sampler when bucket_size > 1."""

    def __init__(self, mixture: Dataset, global_batch_size: int, seed: int, bucket_size: int = 1) -> None:
        super().__init__(mixture, global_batch_size, seed, bucket_size=1)
        self.mixture, self.bucket = mixture, bucket_size

    def _lengths(self, samples: np.ndarray) -> np.ndarray:
        return self.mixture.lengths_of(samples)

    def _positions(self, start: int, count: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64)

