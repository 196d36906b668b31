"""Tokenize a text corpus once into a memory-mapped token file under `data.cache_dir`, then reuse it.

The file holds every document's ids followed by `eos`, concatenated (uint16 when the vocabulary fits,
else uint32); a companion `.docs.npy` holds each document's end offset (its eos included). The cache
key covers the source's identity (paths, sizes, mtimes), the tokenizer and `data.max_bytes`, so a
changed corpus or tokenizer gets a new file. Files are written to a temporary name and renamed into
place, so a crash never leaves a truncated file, and concurrent writers produce identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigtrain.config.schema import DataConfig
from bigtrain.data.embedded import stdlib_documents, stdlib_files, stdlib_root
from bigtrain.data.files import file_identity, read_documents, resolve_files
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError

_FORMAT_VERSION = 1
_DOCS_PER_BATCH = 256


@dataclass
class TokenCorpus:
    """A tokenized corpus: `tokens` (read-only memmap) and `doc_ends` (exclusive end of each document)."""

    tokens: np.ndarray
    doc_ends: np.ndarray
    path: Path
    from_cache: bool


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def text_source(cfg: DataConfig) -> tuple[object, Callable[[], Iterator[str]]]:
    """(identity, document reader) of data.source: the embedded corpus or local files."""
    if cfg.source == "embedded":
        files = stdlib_files(cfg.max_bytes)
        identity = {"embedded": str(stdlib_root()), "python": sys.version, "files": files}
        return identity, lambda: stdlib_documents(files)
    files = resolve_files(cfg.source, cfg.format)
    identity = {"files": file_identity(files), "text_field": cfg.text_field}
    return identity, lambda: read_documents(files, cfg.text_field, cfg.cache_dir)


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> TokenCorpus:
    """The cached token file of data.source, built first if it is missing."""
    identity, documents = text_source(cfg)
    key_src = json.dumps({"v": _FORMAT_VERSION, "source": identity, "tokenizer": tokenizer.name,
                          "max_bytes": cfg.max_bytes}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    dtype = token_dtype(tokenizer.vocab_size)
    folder = Path(cfg.cache_dir) / "tokens"
    tokens_path = folder / f"{key}.{dtype.name}.bin"
    docs_path = folder / f"{key}.docs.npy"
    cached = _open(tokens_path, docs_path, dtype)
    if cached is not None:
        return cached
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create '{folder}' ({exc}). Set data.cache_dir to a "
                        f"writable directory.") from exc
    _write(documents(), tokenizer, dtype, tokens_path, docs_path, cfg.source)
    corpus = _open(tokens_path, docs_path, dtype)
    assert corpus is not None
    corpus.from_cache = False
    return corpus


def _open(tokens_path: Path, docs_path: Path, dtype: np.dtype) -> TokenCorpus | None:
    """The cached corpus, or None when it is absent or inconsistent (then it is rebuilt)."""
    if not (tokens_path.is_file() and docs_path.is_file()):
        return None
    try:
        doc_ends = np.load(docs_path, allow_pickle=False)
        size = tokens_path.stat().st_size
        if size == 0 or size % dtype.itemsize or len(doc_ends) == 0 or doc_ends[-1] != size // dtype.itemsize:
            return None
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r")
    except (OSError, ValueError):
        return None
    return TokenCorpus(tokens, doc_ends, tokens_path, from_cache=True)


def _write(documents: Iterator[str], tokenizer: Tokenizer, dtype: np.dtype, tokens_path: Path,
           docs_path: Path, source: str) -> None:
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    ends: list[int] = []
    total = 0
    temps: list[Path] = []
    try:
        tmp_tokens, tmp_docs = _temp_name(tokens_path, temps), _temp_name(docs_path, temps)
        with open(tmp_tokens, "wb") as out:
            for batch in _batches(documents, _DOCS_PER_BATCH):
                for ids in tokenizer.encode_arrays(batch):
                    if len(ids) == 0:
                        continue
                    out.write(ids.astype(dtype, copy=False).tobytes())
                    out.write(eos.tobytes())
                    total += len(ids) + 1
                    ends.append(total)
            out.flush()
            os.fsync(out.fileno())
        if total == 0:
            raise DataError(
                f"data.source: '{source}' contains no text (no non-empty documents). Point data.source at "
                f"a corpus with text, check data.text_field for JSONL/Parquet files, or use 'embedded'.")
        with open(tmp_docs, "wb") as out:
            np.save(out, np.asarray(ends, dtype=np.int64), allow_pickle=False)
        for tmp in temps:
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by all
        os.replace(tmp_docs, docs_path)
        os.replace(tmp_tokens, tokens_path)
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


def _temp_name(path: Path, temps: list[Path]) -> Path:
    """A fresh temporary file beside `path`, recorded in `temps` for cleanup."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot write in '{path.parent}' ({exc}). Set data.cache_dir to a "
                        f"writable directory.") from exc
    os.close(fd)
    temps.append(Path(name))
    return temps[-1]


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
