"""Reading a prepared corpus: a folder of token shards with an index (the format is in bigtrain.data.corpus).

`open_prepared` checks the folder before use — the index's format and tokenizer, each shard's document ends
against its token file, and that every id is below the vocabulary size and every document ends with the
end-of-document id — and returns a `TokenCorpus` whose `tokens` read across shard boundaries as one vector.
A corpus up to `EAGER_CHECK_BYTES` of tokens has all its ids (and the eos closing each document) checked at open; a
larger one checks the ids of every slice it is read from, as it is read, so that start-up does not read the whole
corpus on every rank (its document ends are checked at open either way). A damaged folder stops the run with a
DataError naming the file and what to delete (or, for a folder given as data.source, how to prepare it again).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigtrain.data.tokenizer import Tokenizer
from bigtrain.errors import DataError
from bigtrain.io import confined

INDEX = "index.json"
INDEX_FORMAT = "bigtrain-tokens"
FORMAT_VERSION = 2
EAGER_CHECK_BYTES = 1 << 30
_CHECK_CHUNK = 1 << 24  # tokens per chunk when scanning a shard for out-of-vocabulary ids
_OPEN_SHARDS = 64  # shards kept memory-mapped at once (each map holds a file descriptor)


@dataclass
class TokenCorpus:
    """A tokenized corpus: `tokens` (read-only; a memmap for one shard, a `ShardedTokens` for more) and `doc_ends`
    (global exclusive end of each document, eos included). `path` is the first shard's token file (the whole
    corpus when there is one shard), `folder` the prepared folder."""

    tokens: np.ndarray
    doc_ends: np.ndarray
    path: Path
    from_cache: bool
    folder: Path | None = None
    shards: int = 1


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardedTokens:
    """The shards' token files as one read-only vector: `len()`, `tokens[i]`, `tokens[a:b]` (across shard
    boundaries; a numpy array), integer-array indexing, `np.asarray(tokens)` (copies everything: small corpora).

    Shards are memory-mapped on first use, at most `_OPEN_SHARDS` at a time. `check_read(k, start, piece)` sees every
    piece read (of shard k, from its token `start`): the lazy id check of large corpora."""

    ndim = 1

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype,
                 check_read: Callable[[int, int, np.ndarray], None] | None = None) -> None:
        self.paths, self.counts, self.dtype = paths, counts, np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.check_read = check_read
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    @property
    def nbytes(self) -> int:
        return len(self) * self.dtype.itemsize

    def shard(self, k: int) -> np.ndarray:
        """Shard k's tokens (a read-only memmap; empty for an empty shard)."""
        array = self._maps.get(k)
        if array is not None:
            self._maps.move_to_end(k)
            return array
        if self.counts[k] == 0:
            array = np.zeros(0, dtype=self.dtype)
        else:
            array = np.memmap(self.paths[k], dtype=self.dtype, mode="r", shape=(self.counts[k],))
        self._maps[k] = array
        while len(self._maps) > _OPEN_SHARDS:
            self._maps.popitem(last=False)
        return array

    def _piece(self, k: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of shard k (a view of its map), checked when reads are checked."""
        piece = self.shard(k)[start:stop]
        if self.check_read is not None:
            self.check_read(k, start, piece)
        return piece

    def _shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def __getitem__(self, key: Any) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:  # rare: through a copy of the whole vector
                return np.asarray(self)[key]
            if stop <= start:
                return np.zeros(0, dtype=self.dtype)
            k = self._shard_of(start)
            if stop <= self.starts[k + 1]:  # inside one shard: a view of its map
                return self._piece(k, start - int(self.starts[k]), stop - int(self.starts[k]))
            out = np.empty(stop - start, dtype=self.dtype)
            pos = start
            while pos < stop:
                k = self._shard_of(pos)
                end = min(stop, int(self.starts[k + 1]))
                out[pos - start:end - start] = self._piece(k, pos - int(self.starts[k]), end - int(self.starts[k]))
                pos = end
            return out
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"token {int(key)} out of range [0, {n})")
            k = self._shard_of(i)
            return self._piece(k, i - int(self.starts[k]), i - int(self.starts[k]) + 1)[0]
        index = np.asarray(key)
        if index.dtype.kind not in "iu":
            raise TypeError(f"ShardedTokens indices must be integers or slices, not {index.dtype}")
        index = np.where(index < 0, index + n, index).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"token index out of range [0, {n})")
        out = np.empty(index.shape, dtype=self.dtype)
        which = np.searchsorted(self.starts, index, side="right") - 1
        for k in np.unique(which).tolist():
            mask = which == k
            local = index[mask] - self.starts[k]
            out[mask] = self.shard(k)[local]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[0:len(self)]
        return np.array(out, dtype=dtype) if dtype is not None else np.array(out)

    def tolist(self) -> list[int]:
        return self[0:len(self)].tolist()

    def __iter__(self):
        for k in range(len(self.counts)):
            yield from self.shard(k)

    def __eq__(self, other: object) -> np.ndarray:  # type: ignore[override]
        return np.asarray(self) == other

    def __ne__(self, other: object) -> np.ndarray:  # type: ignore[override]
        return np.asarray(self) != other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} {self.dtype.name} tokens in {len(self.counts)} shards)"


# --- opening ------------------------------------------------------------------------------------------


def read_index(folder: Path) -> dict[str, Any] | None:
    """The folder's index, None when it has none; DataError when it is not a bigtrain index."""
    path = folder / INDEX
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot read '{path}' ({exc}). Make it readable.") from exc
    try:
        index = json.loads(text)
    except ValueError as exc:
        raise corrupt(path, f"it is not JSON ({exc})", rebuildable=True) from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DataError(f"data.source: '{folder}' holds an index.json that `bigtrain prepare` did not write (no "
                        f"\"format\": \"{INDEX_FORMAT}\"). Point data.source at a folder written by bigtrain prepare, "
                        f"at data files, or at a datasets folder.")
    if index.get("version") != FORMAT_VERSION:
        raise DataError(f"data.source: the prepared folder '{folder}' has format version {index.get('version')}, "
                        f"this bigtrain reads version {FORMAT_VERSION}. Prepare the data again with this bigtrain "
                        f"(bigtrain prepare --config FILE), after deleting that folder.")
    return index


def shard_files(folder: Path, index: dict[str, Any]) -> list[tuple[Path, Path]]:
    """Each shard's (token file, document ends file), as the index names them: inside `folder`, or a DataError
    (a crafted index could name any file on the machine)."""
    fix = (f"Delete '{folder}' (a token cache is built again), or prepare its source again (bigtrain prepare "
           f"--config FILE).")

    def inside(shard: Any, suffix: str) -> Path:
        name = shard.get("name") if isinstance(shard, dict) else None
        return confined(folder, f"{name}{suffix}" if isinstance(name, str) else name, folder / INDEX, fix, DataError)

    return [(inside(s, ".bin"), inside(s, ".docs.npy")) for s in index["shards"]]


def files_present(folder: Path, index: dict[str, Any]) -> bool:
    return all(b.is_file() and d.is_file() for b, d in shard_files(folder, index))


def check_tokenizer(folder: Path, index: dict[str, Any], tokenizer: Tokenizer, setting: str,
                    rebuildable: bool) -> None:
    """DataError naming data.tokenizer when the folder was tokenized with another tokenizer."""
    theirs = index.get("tokenizer", {})
    if theirs.get("name") == tokenizer.name and theirs.get("vocab_size") == tokenizer.vocab_size:
        return
    fix = (f"Delete '{folder}' and it is prepared again with data.tokenizer, or set data.tokenizer to the one it was "
           f"prepared with." if rebuildable else
           f"Set data.tokenizer to the tokenizer it was prepared with, or prepare its source ('{index.get('source')}') "
           f"again with this one (bigtrain prepare --config FILE) and point data.source at the new folder.")
    raise DataError(
        f"data.tokenizer: the prepared data '{folder}' was tokenized with '{theirs.get('name')}' (vocabulary "
        f"{theirs.get('vocab_size')}), but data.tokenizer='{setting}' is '{tokenizer.name}' (vocabulary "
        f"{tokenizer.vocab_size}): its ids would mean other text. {fix}")


def open_prepared(folder: Path, index: dict[str, Any], tokenizer: Tokenizer, setting: str,
                  rebuildable: bool) -> TokenCorpus:
    """The corpus of a prepared folder whose shard files are all present, checked (module docstring)."""
    check_tokenizer(folder, index, tokenizer, setting, rebuildable)
    dtype = np.dtype(index["dtype"])
    files = shard_files(folder, index)
    local_ends, counts = [], []
    for shard, (tokens_path, docs_path) in zip(index["shards"], files, strict=True):
        try:
            local = np.load(docs_path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise corrupt(docs_path, f"it cannot be read ({type(exc).__name__}: {exc})", rebuildable) from exc
        size = tokens_path.stat().st_size
        if size % dtype.itemsize:
            raise corrupt(tokens_path, f"its size {size} bytes is not a multiple of {dtype.itemsize} ({dtype.name} "
                                       f"ids)", rebuildable)
        n = size // dtype.itemsize
        check_doc_ends(local, n, docs_path, rebuildable)
        if n != shard["tokens"] or len(local) != shard["documents"]:
            raise corrupt(tokens_path, f"it holds {n} tokens in {len(local)} documents, but {INDEX} lists "
                                       f"{shard['tokens']} tokens in {shard['documents']} documents", rebuildable)
        local_ends.append(local.astype(np.int64))
        counts.append(n)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    doc_ends = (np.concatenate([e + offsets[k] for k, e in enumerate(local_ends)]) if local_ends
                else np.zeros(0, dtype=np.int64))
    if len(doc_ends) == 0:
        raise corrupt(folder / INDEX, "it lists no documents", rebuildable)

    tokens: Any
    if len(files) == 1:
        try:
            tokens = np.memmap(files[0][0], dtype=dtype, mode="r")
        except (OSError, ValueError) as exc:
            raise corrupt(files[0][0], f"it cannot be mapped ({type(exc).__name__}: {exc})", rebuildable) from exc
        check_shard(tokens, tokenizer, files[0][0], local_ends[0], rebuildable)
    elif sum(counts) * dtype.itemsize <= EAGER_CHECK_BYTES:
        tokens = ShardedTokens([b for b, _ in files], counts, dtype)
        for k, (path, _) in enumerate(files):
            check_shard(tokens.shard(k), tokenizer, path, local_ends[k], rebuildable)
    else:
        def check_read(k: int, start: int, piece: np.ndarray) -> None:
            if piece.size and int(piece.max()) >= tokenizer.vocab_size:
                at = start + int(np.argmax(piece >= tokenizer.vocab_size))
                raise corrupt(files[k][0], f"token {at} has id {int(piece.max())}, not below the vocabulary size "
                                           f"{tokenizer.vocab_size} of tokenizer '{tokenizer.name}'", rebuildable)

        tokens = ShardedTokens([b for b, _ in files], counts, dtype, check_read=check_read)
    return TokenCorpus(tokens, doc_ends, files[0][0], from_cache=True, folder=folder, shards=len(files))


def check_doc_ends(doc_ends: np.ndarray, n_tokens: int, docs_path: Path, rebuildable: bool = True) -> None:
    """DataError unless doc_ends is a strictly increasing integer vector from >= 1 ending at n_tokens (empty only
    for an empty shard)."""
    if doc_ends.ndim != 1 or doc_ends.dtype.kind not in "iu" or (len(doc_ends) == 0 and n_tokens):
        raise corrupt(docs_path, f"it holds a {doc_ends.dtype} array of shape {doc_ends.shape}, not a non-empty "
                                 f"vector of document end offsets", rebuildable)
    if len(doc_ends) == 0:
        return
    steps = np.diff(doc_ends.astype(np.int64), prepend=0)
    if (steps <= 0).any():
        doc = int(np.argmax(steps <= 0))
        raise corrupt(docs_path, f"document ends are not strictly increasing from 1 (end {doc} is "
                                 f"{int(doc_ends[doc])})", rebuildable)
    if int(doc_ends[-1]) != n_tokens:
        raise corrupt(docs_path, f"the last document ends at token {int(doc_ends[-1])}, but the token file "
                                 f"holds {n_tokens} tokens", rebuildable)


def check_shard(tokens: np.ndarray, tokenizer: Tokenizer, path: Path, local_ends: np.ndarray,
                rebuildable: bool = True) -> None:
    """DataError when an id is not below the vocabulary size (scanned in chunks: memory stays flat) or a document
    does not end with the end-of-document id. `local_ends` are the shard's own document ends."""
    vocab = tokenizer.vocab_size
    for start in range(0, len(tokens), _CHECK_CHUNK):
        chunk = tokens[start:start + _CHECK_CHUNK]
        if int(chunk.max()) >= vocab:
            at = start + int(np.argmax(chunk >= vocab))
            raise corrupt(path, f"token {at} has id {int(tokens[at])}, not below the vocabulary size {vocab} of "
                                f"tokenizer '{tokenizer.name}'", rebuildable)
    if len(local_ends):
        last = np.asarray(tokens[local_ends - 1])
        if (last != tokenizer.eos_id).any():
            doc = int(np.argmax(last != tokenizer.eos_id))
            raise corrupt(path, f"document {doc} ends with id {int(last[doc])} at token {int(local_ends[doc]) - 1}, "
                                f"not the end-of-document id {tokenizer.eos_id}", rebuildable)


def corrupt(path: Path, problem: str, rebuildable: bool = True) -> DataError:
    """The DataError of a damaged file of a prepared folder: in data.cache_dir (rebuilt once deleted), or a folder
    given as data.source (prepared again from its source)."""
    folder = path.parent
    if rebuildable:
        return DataError(f"data.cache_dir: the token cache '{path}' is corrupt: {problem}. Delete that file (or the "
                         f"whole folder '{folder}') and it is rebuilt from data.source on the next run (or by bigtrain "
                         f"prepare).")
    return DataError(f"data.source: the prepared data '{path}' is corrupt: {problem}. Prepare its source again "
                     f"(bigtrain prepare --config FILE) or copy the folder '{folder}' again from where it was "
                     f"prepared.")
