"""Whether a prepared folder's shards are still the bytes that were prepared: each `.bin` hashed (SHA-256) and
compared with the digest its index.json lists.

    all      every shard (`data.verify_shards=all`, `bigtrain prepare --verify`)
    auto     every shard while the corpus holds at most `SAMPLE_BYTES` of token files; above that, shards drawn at
             random (a new draw every start, so restarts of a long job check other shards) until about
             `SAMPLE_BYTES` are chosen, at least one; the caller says which fraction was checked

Shards are hashed by a few threads (hashlib releases the GIL). The first damaged shard in index order is named in
one paragraph with the fix (the structural checks of `bigtrain.data.shards` run before this, when the folder is
opened); how many others were found damaged is said too. A training job checks on global rank 0, before the other
ranks stop waiting for it (`TrainingData`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigtrain.data.shards import INDEX, corrupt, shard_files
from bigtrain.io import sha256_of

SAMPLE_BYTES = 4 << 30  # auto: token bytes hashed at most before a corpus is sampled
_THREADS = 8


@dataclass(frozen=True)
class Checked:
    """What a check covered: shards and token bytes hashed, of the folder's totals."""

    folder: Path
    shards: int
    total_shards: int
    nbytes: int
    total_bytes: int

    @property
    def sampled(self) -> bool:
        return self.shards < self.total_shards

    def describe(self) -> str:
        """The console line of a check (a sampled one states its fraction, its bytes and how to check all)."""
        if not self.sampled:
            return (f"data: the SHA-256 of every shard of '{self.folder}' matches its {INDEX} ({self.shards} shards, "
                    f"{self.nbytes / 1e9:.2f} GB)")
        fraction = self.nbytes / max(self.total_bytes, 1)
        return (f"data: checked the SHA-256 of a random {100 * fraction:.2g}% of '{self.folder}' ({self.shards} of "
                f"{self.total_shards} shards, {self.nbytes / 1e9:.2f} of {self.total_bytes / 1e9:.2f} GB; another "
                f"draw at each start): all match. data.verify_shards=all checks every shard")


def shard_bytes(index: dict[str, Any]) -> np.ndarray:
    """Each shard's token file size in bytes, from the index."""
    itemsize = np.dtype(index["dtype"]).itemsize
    return np.array([int(s["tokens"]) * itemsize for s in index["shards"]], dtype=np.int64)


def choose_shards(sizes: np.ndarray, mode: str, budget: int, rng: np.random.Generator | None = None) -> list[int]:
    """The shards to hash, in index order: all of them, or (mode auto, above `budget` bytes) a random set of about
    `budget` bytes (whole shards in a random order until the next would pass the budget; at least one)."""
    if mode == "all" or int(sizes.sum()) <= budget:
        return list(range(len(sizes)))
    rng = rng if rng is not None else np.random.default_rng()
    chosen, total = [], 0
    for k in rng.permutation(len(sizes)).tolist():
        if chosen and total + int(sizes[k]) > budget:
            continue
        chosen.append(k)
        total += int(sizes[k])
    return sorted(chosen)


def verify_shards(folder: Path, index: dict[str, Any], mode: str = "all", rebuildable: bool = True,
                  budget: int | None = None, rng: np.random.Generator | None = None) -> Checked:
    """Hash the shards `mode` chooses (module docstring) and compare them with the index; a DataError naming the
    first one that differs."""
    sizes = shard_bytes(index)
    chosen = choose_shards(sizes, mode, SAMPLE_BYTES if budget is None else budget, rng)
    shards, files = index["shards"], shard_files(folder, index)  # names confined to the folder
    paths = [files[k][0] for k in chosen]
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, os.cpu_count() or 1, len(paths)))) as pool:
        digests = list(pool.map(sha256_of, paths))
    bad = [(k, path, digest) for k, path, digest in zip(chosen, paths, digests, strict=True)
           if digest != shards[k]["sha256"]]
    if bad:
        k, path, digest = bad[0]
        more = f" ({len(bad) - 1} more of the {len(chosen)} shards checked differ too)" if len(bad) > 1 else ""
        raise corrupt(path, f"its SHA-256 is {digest[:16]}..., but {INDEX} lists {shards[k]['sha256'][:16]}...: the "
                            f"file changed after it was prepared{more}", rebuildable)
    return Checked(folder, len(chosen), len(shards), int(sizes[chosen].sum()), int(sizes.sum()))
