"""Building a prepared folder (`build_corpus`): under its lock, the shards the plan lacks (finished shards of an
earlier run are kept), then index.json, written last; the summary of what was found or done (`Prepared`).

The index's totals are sums over the shards: tokens = Σ_k tokens_k, documents = Σ_k documents_k.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigtrain.config.schema import DataConfig
from bigtrain.data.build_lock import BuildLock
from bigtrain.data.build_progress import ProgressDisplay
from bigtrain.data.cache_writes import remove_stale_temps, write_file, write_fix
from bigtrain.data.shard_workers import build_shards, worker_count
from bigtrain.data.shards import FORMAT_VERSION, INDEX, INDEX_FORMAT, files_present, read_index, shard_name, token_dtype
from bigtrain.data.source_plan import plan_shards
from bigtrain.data.source_units import Source
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError


@dataclass
class Prepared:
    """What `prepare_corpus` found or did: the folder, its totals, and the shards built by this call."""

    folder: Path
    source: str
    tokens: int
    documents: int
    shards: int
    built: int
    input_bytes: int
    seconds: float
    dtype: str


def summarize(folder: Path, index: dict[str, Any], built: int, seconds: float) -> Prepared:
    """The Prepared of a folder from its index: its totals, with `built` shards made in `seconds`."""
    return Prepared(folder, index["source"], index["tokens"], index["documents"], len(index["shards"]), built,
                    index["input_bytes"], seconds, index["dtype"])


def build_corpus(folder: Path, source: Source, tokenizer: Tokenizer, cfg: DataConfig, workers: int | None,
                 shard_bytes: int) -> Prepared:
    """Build what is missing of `folder` under its lock; its summary."""
    started = time.perf_counter()
    tokens_dir = folder.parent
    try:
        tokens_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create '{tokens_dir}' ({exc}). {write_fix(exc)}") from exc
    remove_stale_temps(tokens_dir)
    lock = BuildLock(folder.with_name(folder.name + ".lock"), folder)
    lock.acquire()
    remove_lock = False
    try:
        index = read_index(folder)
        if index is not None and files_present(folder, index):  # built by another process while we waited
            return summarize(folder, index, built=0, seconds=time.perf_counter() - started)
        dtype = token_dtype(tokenizer.vocab_size)
        plan = plan_shards(source, shard_bytes)
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise DataError(f"data.cache_dir: cannot create '{folder}' ({exc}). {write_fix(exc)}") from exc
        remove_stale_temps(folder)
        metas = {k: meta for k, spec in enumerate(plan) if (meta := _finished(folder, k, spec, dtype)) is not None}
        todo = [k for k in range(len(plan)) if k not in metas]
        n_workers = worker_count(workers, len(todo), source)
        kept = f", {len(metas)} kept from an earlier run" if metas else ""
        print(f"bigtrain: preparing data.source '{source.description}' ({source.nbytes / 1e6:.1f} MB) into '{folder}': "
              f"{_count(len(plan), 'shard')}{kept}, {n_workers} worker process{'es' if n_workers > 1 else ''}",
              flush=True)
        display = ProgressDisplay(sum(plan[k]["bytes"] for k in todo), len(todo), source.description)
        try:
            metas.update(build_shards(folder, source, tokenizer, cfg.tokenizer, dtype, plan, todo, n_workers, display))
        except BaseException:
            if not any(folder.glob("shard_*.json")):
                shutil.rmtree(folder, ignore_errors=True)
                remove_lock = True
            raise
        finally:
            display.close()
        shards = [metas[k] for k in range(len(plan))]
        if not sum(m["documents"] for m in shards):
            shutil.rmtree(folder, ignore_errors=True)
            remove_lock = True
            raise DataError(
                f"data.source: '{source.description}' contains no text (no non-empty documents). Point data.source "
                f"at a corpus with text, check data.text_field for JSONL/Parquet files and datasets, or use "
                f"'embedded'.")
        for extra in folder.glob("shard_*"):  # of an earlier plan with more shards
            if int(extra.name[6:11]) >= len(plan):
                extra.unlink(missing_ok=True)
        index = _index(source, tokenizer, cfg, dtype, shard_bytes, shards)
        write_file(folder / INDEX, (json.dumps(index, indent=1) + "\n").encode(), source.nbytes, dtype)
        seconds = time.perf_counter() - started
        built = len(todo)
        rate = _rate(sum(plan[k]["bytes"] for k in todo), seconds)
        print(f"bigtrain: prepared '{folder}': {index['tokens']:,} tokens, {index['documents']:,} documents in "
              f"{_count(len(shards), 'shard')} ({built} built in {seconds:.1f} s, {rate})", flush=True)
        return summarize(folder, index, built=built, seconds=seconds)
    finally:
        lock.release(remove=remove_lock)


def _index(source: Source, tokenizer: Tokenizer, cfg: DataConfig, dtype: np.dtype, shard_bytes: int,
           shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT, "version": FORMAT_VERSION, "source": source.description,
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": dtype.name, "tokens": sum(m["tokens"] for m in shards),
        "documents": sum(m["documents"] for m in shards), "input_bytes": source.nbytes,
        "settings": {"max_bytes": cfg.max_bytes, "encoding_errors": cfg.encoding_errors,
                     "text_field": cfg.text_field, "shard_bytes": shard_bytes},
        "shards": [{"name": shard_name(m["shard"]), "tokens": m["tokens"], "documents": m["documents"],
                    "input_bytes": m["spec"]["bytes"], "sha256": m["sha256"]} for m in shards],
        "source_identity": source.identity,
    }


def _finished(folder: Path, k: int, spec: dict[str, Any], dtype: np.dtype) -> dict[str, Any] | None:
    """Shard k's record when it was finished for this plan (its .json present and matching, its files' sizes
    right); None when it must be made (again)."""
    name = shard_name(k)
    try:
        meta = json.loads((folder / f"{name}.json").read_text())
        size = (folder / f"{name}.bin").stat().st_size
        present = (folder / f"{name}.docs.npy").is_file()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("spec") != spec or meta.get("dtype") != dtype.name:
        return None
    if not present or size != meta.get("tokens", -1) * dtype.itemsize:
        return None
    return meta


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-9) / 1e6:.1f} MB/s of input"
