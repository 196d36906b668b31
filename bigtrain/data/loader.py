"""What a training run reads, on every rank: `TrainingData`.

    build         rank 0 prepares the corpus (token shards, docs/data.md) first, or checks the prepared shards
                  against their SHA-256 (data.verify_shards); the other ranks wait on a host group with a timeout of
                  days (preparing or checking can outlast parallel.collective_timeout), then read the shards
    order         the global batch of step k is a pure function of (seed, k) (`GlobalBatchSampler`, or
                  `MixtureSampler` over a mixture), the same samples under every layout
    this rank     the global batch is split into contiguous equal slices by data-parallel rank, each slice into
                  micro-batches of train.micro_batch_size, collated on the host (with their target and input token
                  counts) by a background thread a few steps ahead, then copied to the device
    held out      train.eval_samples sequences, the same under every layout and batch split
                  (`bigtrain.data.heldout`), in micro-batches of train.micro_batch_size, by source
    mixture       the input tokens each source contributed to a global batch, its samples and epochs so far
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from bigtrain.config import Config
from bigtrain.data.build import build_datasets
from bigtrain.data.collate import collate
from bigtrain.data.corpus import data_ready
from bigtrain.data.heldout import HeldOutPart, heldout_parts
from bigtrain.data.mixture import Mixture
from bigtrain.data.prefetch import BatchPrefetcher, prepare
from bigtrain.data.sampler import GlobalBatchSampler, MixtureSampler
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.distributed.agree import on_main
from bigtrain.distributed.groups import ParallelGroups

Batch = dict[str, torch.Tensor]


class TrainingData:
    def __init__(self, cfg: Config, tokenizer: Tokenizer, groups: ParallelGroups | None, device: torch.device
                 ) -> None:
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.rank = groups.rank if groups is not None else 0
        self.dp_rank = groups.get_data_parallel_rank() if groups is not None else 0
        self.dp_size = groups.layout.data if groups is not None else 1
        self.pad_multiple = 1  # sequences padded to a multiple of it (set once the model is parallel)
        if groups is not None:
            # Whether rank 0 finds the corpus prepared, before it starts preparing: every rank knows the same.
            ready = on_main(self.rank == 0, groups, lambda: data_ready(cfg, tokenizer))
            if self.rank != 0:
                if not ready:
                    print(f"bigtrain: rank {self.rank}: waiting for rank 0 to prepare data ...", flush=True)
                torch.distributed.barrier(group=groups.long_wait)
        self.train_set, self.heldout_set = build_datasets(cfg, tokenizer, verify=self.rank == 0)
        if groups is not None and self.rank == 0:
            torch.distributed.barrier(group=groups.long_wait)
        t = cfg.train
        bucket = cfg.data.bucket_size if cfg.model.family != "causal" else 1
        sampler = MixtureSampler if self.is_mixture else GlobalBatchSampler
        self.sampler = sampler(self.train_set, t.global_batch_size, t.seed, bucket_size=bucket)
        self._prefetch: BatchPrefetcher | None = None

    @property
    def is_mixture(self) -> bool:
        return isinstance(self.train_set, Mixture)

    def _collate(self, samples: list[Any]) -> Batch:
        return collate(samples, self.cfg.model.family, self.tokenizer.pad_id, self.pad_multiple)

    # ---- training batches ----------------------------------------------------------------------------
    def host_micro_batches(self, step: int) -> list[Batch]:
        """This rank's share of the global batch of 0-based step `step`, cut into micro-batches, on the host."""
        indices = self.sampler.indices(step)
        share = len(indices) // self.dp_size
        indices = indices[self.dp_rank * share:(self.dp_rank + 1) * share]
        size = self.cfg.train.micro_batch_size
        return [self._collate([self.train_set[i] for i in indices[s:s + size]]) for s in range(0, len(indices), size)]

    @contextlib.contextmanager
    def prefetching(self, first_step: int, last_step: int) -> Iterator[None]:
        """Within the block, `micro_batches` takes steps first_step.. from a thread that prepares them ahead."""
        self._prefetch = BatchPrefetcher(self.host_micro_batches, first_step, last_step,
                                         pin=self.device.type == "cuda")
        try:
            yield
        finally:
            self._prefetch.close()
            self._prefetch = None

    def micro_batches(self, step: int) -> tuple[list[Batch], tuple[int, int]]:
        """Step `step`'s micro-batches on the device and their (target, input) token counts on this rank (counted
        on the host). Called once per step, in order, on the training thread."""
        host = self._prefetch.get(step) if self._prefetch is not None else prepare(self.host_micro_batches, step)
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in host.micro_batches]
        return batches, (host.targets, host.tokens)

    # ---- held-out batches ----------------------------------------------------------------------------
    def heldout_parts(self) -> list[HeldOutPart]:
        """The held-out set by source, in micro-batches on the device (every rank evaluates all of them: ZeRO-3
        needs every rank in each forward)."""
        return heldout_parts(self.cfg, self.tokenizer, self.heldout_set, self.device, self.pad_multiple)

    def heldout_batches(self) -> list[Batch]:
        """Every held-out micro-batch, the sources' one after the other."""
        return [b for part in self.heldout_parts() for b in part.batches]

    # ---- a mixture's accounting ----------------------------------------------------------------------
    def source_tokens(self, step: int) -> dict[str, int]:
        """A mixture's input tokens by source in the global batch of 0-based step `step` (every rank alike);
        empty for one source."""
        if not self.is_mixture:
            return {}
        positions = np.asarray(self.sampler.indices(step))
        sources, _ = self.train_set.locate(positions)
        tokens = np.bincount(sources, weights=self.train_set.lengths_of(positions),
                             minlength=len(self.train_set.names))
        return {name: int(n) for name, n in zip(self.train_set.names, tokens.tolist(), strict=True)}

    def source_record(self, steps_done: int, source_tokens: dict[str, int]) -> dict[str, Any]:
        """metrics.jsonl's "sources": per mixture source, input tokens, samples and epochs trained so far."""
        if not self.is_mixture:
            return {}
        position = steps_done * self.cfg.train.global_batch_size
        draws, epochs = self.train_set.draws_before(position), self.train_set.epochs_before(position)
        return {"sources": {name: {"tokens": source_tokens.get(name, 0), "samples": int(draws[k]),
                                   "epochs": float(epochs[k])} for k, name in enumerate(self.train_set.names)}}

