"""Tokenize a text corpus once into a memory-mapped token file under `data.cache_dir`, then reuse it.

The file holds every document's ids followed by `eos`, concatenated (uint16 when the vocabulary fits,
else uint32); a companion `.docs.npy` holds each document's end offset (its eos included). The cache
key covers the source's identity (paths, sizes, mtimes), the tokenizer, `data.max_bytes` and
`data.encoding_errors`, so a changed corpus or setting gets a new file. A cache that exists is checked
before use (sizes, ids below the vocabulary size, increasing document ends each closed by eos); a
corrupt one stops the run, naming the file to delete. Files are written to a temporary name and renamed
into place, so a crash never leaves a truncated file, and concurrent writers produce identical files.
Temporary names carry the writer's host and pid (`<final name>.<host>.<pid>.<random>.tmp`); leftovers of
a killed writer on this host are removed before the next build, never those of a live one. A failed write
(disk full, read-only or unwritable cache) stops the run with the path and sizes, leaving no partial file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bigtrain.config.schema import DataConfig
from bigtrain.data.embedded import stdlib_documents, stdlib_files, stdlib_root
from bigtrain.data.files import file_identity, read_documents, resolve_files
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError

_FORMAT_VERSION = 1
_DOCS_PER_BATCH = 256
_CHECK_CHUNK = 1 << 24  # tokens per chunk when scanning a cached file for out-of-vocabulary ids


@dataclass
class TokenCorpus:
    """A tokenized corpus: `tokens` (read-only memmap) and `doc_ends` (exclusive end of each document)."""

    tokens: np.ndarray
    doc_ends: np.ndarray
    path: Path
    from_cache: bool


@dataclass
class TextSource:
    """What the cache key needs of data.source (`identity`), its documents, and its size in bytes."""

    identity: object
    documents: Callable[[], Iterator[str]]
    nbytes: int


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def text_source(cfg: DataConfig) -> TextSource:
    """Identity, document reader and size of data.source: the embedded corpus or local files."""
    if cfg.source == "embedded":
        files = stdlib_files(cfg.max_bytes)
        identity = {"embedded": str(stdlib_root()), "python": sys.version, "files": files}
        return TextSource(identity, lambda: stdlib_documents(files), sum(take for _, take, _ in files))
    files = resolve_files(cfg.source, cfg.format)
    ident = file_identity(files)
    return TextSource({"files": ident, "text_field": cfg.text_field},
                      lambda: read_documents(files, cfg.text_field, cfg.cache_dir, cfg.encoding_errors),
                      sum(size for _, _, size, _ in ident))


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer) -> TokenCorpus:
    """The cached token file of data.source, built first if it is missing."""
    source = text_source(cfg)
    key_src = json.dumps({"v": _FORMAT_VERSION, "source": source.identity, "tokenizer": tokenizer.name,
                          "max_bytes": cfg.max_bytes, "encoding_errors": cfg.encoding_errors}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    dtype = token_dtype(tokenizer.vocab_size)
    folder = Path(cfg.cache_dir) / "tokens"
    tokens_path = folder / f"{key}.{dtype.name}.bin"
    docs_path = folder / f"{key}.docs.npy"
    cached = _open(tokens_path, docs_path, dtype, tokenizer)
    if cached is not None:
        return cached
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create '{folder}' ({exc}). {_write_fix(exc)}") from exc
    remove_stale_temps(folder)
    _write(source, tokenizer, dtype, tokens_path, docs_path, cfg.source)
    corpus = _open(tokens_path, docs_path, dtype, tokenizer)
    assert corpus is not None
    corpus.from_cache = False
    return corpus


# --- checking a cache -------------------------------------------------------------------------------


def _open(tokens_path: Path, docs_path: Path, dtype: np.dtype, tokenizer: Tokenizer) -> TokenCorpus | None:
    """The cached corpus, None when a file is missing (then it is built), DataError when it is corrupt."""
    if not (tokens_path.is_file() and docs_path.is_file()):
        return None
    try:
        doc_ends = np.load(docs_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _corrupt(docs_path, f"it cannot be read ({type(exc).__name__}: {exc})") from exc
    size = tokens_path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise _corrupt(tokens_path, f"its size {size} bytes is not a positive multiple of {dtype.itemsize} "
                                    f"({dtype.name} ids)")
    _check_doc_ends(doc_ends, size // dtype.itemsize, docs_path)
    try:
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r")
    except (OSError, ValueError) as exc:
        raise _corrupt(tokens_path, f"it cannot be mapped ({type(exc).__name__}: {exc})") from exc
    _check_ids(tokens, tokenizer, tokens_path)
    last = tokens[doc_ends - 1]
    if (last != tokenizer.eos_id).any():
        doc = int(np.argmax(last != tokenizer.eos_id))
        raise _corrupt(tokens_path, f"document {doc} ends with id {int(last[doc])} at token {int(doc_ends[doc]) - 1}"
                                    f", not the end-of-document id {tokenizer.eos_id}")
    return TokenCorpus(tokens, doc_ends, tokens_path, from_cache=True)


def _check_doc_ends(doc_ends: np.ndarray, n_tokens: int, docs_path: Path) -> None:
    """DataError unless doc_ends is a non-empty, strictly increasing integer vector ending at n_tokens."""
    if doc_ends.ndim != 1 or doc_ends.dtype.kind not in "iu" or len(doc_ends) == 0:
        raise _corrupt(docs_path, f"it holds a {doc_ends.dtype} array of shape {doc_ends.shape}, not a non-empty "
                                  f"vector of document end offsets")
    steps = np.diff(doc_ends.astype(np.int64), prepend=0)
    if (steps <= 0).any():
        doc = int(np.argmax(steps <= 0))
        raise _corrupt(docs_path, f"document ends are not strictly increasing from 1 (end {doc} is "
                                  f"{int(doc_ends[doc])})")
    if int(doc_ends[-1]) != n_tokens:
        raise _corrupt(docs_path, f"the last document ends at token {int(doc_ends[-1])}, but the token file "
                                  f"holds {n_tokens} tokens")


def _check_ids(tokens: np.ndarray, tokenizer: Tokenizer, tokens_path: Path) -> None:
    """DataError when an id is not below the vocabulary size; scans in chunks so memory stays flat."""
    vocab = tokenizer.vocab_size
    for start in range(0, len(tokens), _CHECK_CHUNK):
        chunk = tokens[start:start + _CHECK_CHUNK]
        if int(chunk.max()) >= vocab:
            at = start + int(np.argmax(chunk >= vocab))
            raise _corrupt(tokens_path, f"token {at} has id {int(tokens[at])}, not below the vocabulary size "
                                        f"{vocab} of tokenizer '{tokenizer.name}'")


def _corrupt(path: Path, problem: str) -> DataError:
    return DataError(
        f"data.cache_dir: the token cache '{path}' is corrupt: {problem}. Delete that file (or the whole "
        f"data.cache_dir folder '{path.parent.parent}') and it is rebuilt from data.source on the next run.")


# --- writing a cache --------------------------------------------------------------------------------


def _write(source: TextSource, tokenizer: Tokenizer, dtype: np.dtype, tokens_path: Path, docs_path: Path,
           source_name: str) -> None:
    """Tokenize the source into temporary files, then rename them into place (docs first)."""
    temps: list[Path] = []
    progress = _Progress()
    target = tokens_path
    try:
        try:
            tmp_tokens = _temp_name(tokens_path, temps)
            ends = _write_tokens(_read(source.documents(), source_name), tokenizer, dtype, tmp_tokens, progress)
            if not ends:
                raise DataError(
                    f"data.source: '{source_name}' contains no text (no non-empty documents). Point data.source "
                    f"at a corpus with text, check data.text_field for JSONL/Parquet files, or use 'embedded'.")
            target = docs_path
            tmp_docs = _temp_name(docs_path, temps)
            with open(tmp_docs, "wb") as out:
                np.save(out, np.asarray(ends, dtype=np.int64), allow_pickle=False)
                out.flush()
                os.fsync(out.fileno())
            for tmp in temps:
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by all
            os.replace(tmp_docs, docs_path)
            os.replace(tmp_tokens, tokens_path)
        except OSError as exc:
            raise _write_error(exc, target, progress, source.nbytes, dtype) from exc
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _read(documents: Iterator[str], source_name: str) -> Iterator[str]:
    """The documents, with an OSError while reading them made a DataError (not taken for a cache write error)."""
    try:
        yield from documents
    except OSError as exc:
        raise DataError(f"data.source: reading '{source_name}' failed ({exc}). Check that its files are "
                        f"readable, or point data.source elsewhere.") from exc


@dataclass
class _Progress:
    """How far a build got: characters of the documents written and bytes written (for the disk-full message)."""

    chars: int = 0
    written: int = 0


def _write_tokens(documents: Iterator[str], tokenizer: Tokenizer, dtype: np.dtype, path: Path,
                  progress: _Progress) -> list[int]:
    """Write every document's ids and eos to `path`; the end offset of each document."""
    eos = np.array([tokenizer.eos_id], dtype=dtype).tobytes()
    ends: list[int] = []
    total = 0
    with open(path, "wb") as out:
        for batch in _batches(documents, _DOCS_PER_BATCH):
            for doc, ids in zip(batch, tokenizer.encode_arrays(batch), strict=True):
                if len(ids) == 0:
                    continue
                _write_chunk(out, ids.astype(dtype, copy=False).tobytes() + eos)
                progress.chars += len(doc)
                progress.written += (len(ids) + 1) * dtype.itemsize
                total += len(ids) + 1
                ends.append(total)
        out.flush()
        os.fsync(out.fileno())
    return ends


def _write_chunk(out: BinaryIO, data: bytes) -> None:
    """Write one document's bytes to the open temporary token file."""
    out.write(data)


def _write_error(exc: OSError, path: Path, progress: _Progress, source_bytes: int, dtype: np.dtype) -> DataError:
    """The DataError of an OSError while writing the cache: path, error, bytes written and needed, fix."""
    if progress.chars and progress.written:
        needed = int(progress.written / progress.chars * source_bytes)  # ids per character so far, scaled
    else:
        needed = source_bytes * dtype.itemsize  # at most one id per byte with the byte tokenizer
    return DataError(
        f"data.cache_dir: writing the token cache '{path}' failed ({exc}) after {_size(progress.written)} "
        f"written; the finished cache needs about {_size(needed)}. {_write_fix(exc)} The temporary files were "
        f"removed.")


def _write_fix(exc: OSError) -> str:
    """How to fix an OSError on the cache directory, by errno."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free disk space there, or set data.cache_dir to a directory on a disk with room."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Make that folder writable, or set data.cache_dir to a writable directory."
    if exc.errno == errno.ENAMETOOLONG:
        return "Set data.cache_dir to a shorter path."
    return "Check the disk, or set data.cache_dir to another writable directory."


def _size(nbytes: int) -> str:
    return f"{nbytes} bytes" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):.1f} MiB"


# --- temporary files --------------------------------------------------------------------------------


def _writer_tag() -> str:
    """This host in temporary names: the host name without dots, plus the Linux PID namespace if known.

    The namespace keeps containers that share a host name, but not process ids, from taking each other's
    writers for dead.
    """
    tag = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
    with contextlib.suppress(OSError):
        tag += "-" + "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    return tag


def _temp_name(path: Path, temps: list[Path]) -> Path:
    """A fresh temporary file beside `path` named for its writer, recorded in `temps` for cleanup."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{_writer_tag()}.{os.getpid()}.",
                                    suffix=".tmp")
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot write in '{path.parent}' ({exc}). {_write_fix(exc)}") from exc
    os.close(fd)
    temps.append(Path(name))
    return temps[-1]


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files in `folder` whose writer ran on this host and is gone; the removed paths.

    Files of live writers, of other hosts, and names this module did not make are kept.
    """
    tag, removed = _writer_tag(), []
    for path in folder.glob("*.tmp"):
        parts = path.name.rsplit(".", 4)  # final name, host tag, pid, random part, "tmp"
        if len(parts) != 5 or parts[1] != tag or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        try:
            path.unlink()
        except OSError:  # another cleaner was first, or the folder is not ours to change
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return True  # not a process id: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, owned by someone else
    return True


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
