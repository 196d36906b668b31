"""Tokenizing one shard (`build_shard`): its documents' ids, each document followed by eos, into shard_NNNNN.bin,
the exclusive end offset of each document into shard_NNNNN.docs.npy, then its record (.json, written last).

A document of n ids occupies n + 1 ids of the .bin, so end_i = Σ_{j ≤ i} (n_j + 1); empty documents are skipped.
Documents are tokenized in batches of 256 documents or 2^20 characters. This module is what the worker processes of
`bigtrain prepare` run: it must load without torch.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bigtrain.data.cache_writes import WriteProgress, temp_name, write_error
from bigtrain.data.shards import shard_name
from bigtrain.data.source_reading import read_shard
from bigtrain.data.source_units import Source
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError

_DOCS_PER_BATCH = 256
_BATCH_CHARS = 1 << 20  # a tokenizer batch ends after this many characters (or _DOCS_PER_BATCH documents)


def build_shard(folder: Path, k: int, spec: dict[str, Any], source: Source, tokenizer: Tokenizer, dtype: np.dtype,
                report: Callable[[int], None]) -> dict[str, Any]:
    """Tokenize shard k into temporary files, then rename them into place (.bin, .docs.npy, then .json); its
    record."""
    name = shard_name(k)
    tokens_path, docs_path, meta_path = (folder / f"{name}.bin", folder / f"{name}.docs.npy",
                                         folder / f"{name}.json")
    temps: list[Path] = []
    progress = WriteProgress()
    target = tokens_path
    try:
        try:
            tmp_tokens = temp_name(tokens_path, temps)
            ends, digest = _write_tokens(_read(read_shard(source, spec), source.description), tokenizer, dtype,
                                         tmp_tokens, progress, report)
            target = docs_path
            tmp_docs = temp_name(docs_path, temps)
            with open(tmp_docs, "wb") as out:
                np.save(out, np.frombuffer(ends, dtype=np.int64), allow_pickle=False)
                out.flush()
                os.fsync(out.fileno())
            meta = {"shard": k, "spec": spec, "dtype": dtype.name, "tokens": ends[-1] if ends else 0,
                    "documents": len(ends), "sha256": digest}
            target = meta_path
            tmp_meta = temp_name(meta_path, temps)
            with open(tmp_meta, "w") as out:
                out.write(json.dumps(meta) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_tokens, tokens_path)
            os.replace(tmp_docs, docs_path)
            os.replace(tmp_meta, meta_path)
        except OSError as exc:
            raise write_error(exc, target, progress, source.nbytes, dtype) from exc
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return meta


def _read(documents: Iterator[tuple[str | None, int]], source_name: str) -> Iterator[tuple[str | None, int]]:
    """The documents, with an OSError while reading them made a DataError (not taken for a cache write error)."""
    try:
        yield from documents
    except OSError as exc:
        raise DataError(f"data.source: reading '{source_name}' failed ({exc}). Check that its files are "
                        f"readable, or point data.source elsewhere.") from exc


def _write_tokens(documents: Iterator[tuple[str | None, int]], tokenizer: Tokenizer, dtype: np.dtype, path: Path,
                  progress: WriteProgress, report: Callable[[int], None]) -> tuple[array.array, str]:
    """Write every document's ids and eos to `path`; (the end offset of each document, SHA-256 of the file)."""
    eos = np.array([tokenizer.eos_id], dtype=dtype).tobytes()
    ends = array.array("q")
    digest = hashlib.sha256()
    total = 0
    with open(path, "wb") as out:
        for batch, consumed in _batches(documents):
            for ids in tokenizer.encode_arrays(batch):
                if len(ids) == 0:
                    continue
                data = ids.astype(dtype, copy=False).tobytes() + eos
                _write_chunk(out, data)
                digest.update(data)
                progress.written += len(data)
                total += len(ids) + 1
                ends.append(total)
            progress.read += consumed
            report(consumed)
        out.flush()
        os.fsync(out.fileno())
    return ends, digest.hexdigest()


def _batches(documents: Iterator[tuple[str | None, int]]) -> Iterator[tuple[list[str], int]]:
    """(non-empty documents, input bytes they took) in batches of _DOCS_PER_BATCH documents or _BATCH_CHARS
    characters."""
    batch: list[str] = []
    chars = consumed = 0
    for text, nbytes in documents:
        consumed += nbytes
        if text:
            batch.append(text)
            chars += len(text)
        if len(batch) >= _DOCS_PER_BATCH or chars >= _BATCH_CHARS:
            yield batch, consumed
            batch, chars, consumed = [], 0, 0
    if batch or consumed:
        yield batch, consumed


def _write_chunk(out: BinaryIO, data: bytes) -> None:
    """Write one document's bytes to the open temporary token file."""
    out.write(data)
