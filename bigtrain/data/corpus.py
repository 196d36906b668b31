"""Tokenize a corpus once into sharded token files under `data.cache_dir` (`bigtrain prepare`, or the first
training run), then read them.

A prepared folder, `<data.cache_dir>/tokens/<key>.<dtype>/`, holds

    shard_NNNNN.bin         the shard's documents' ids, each document followed by eos (uint16 when the vocabulary
                            fits, else uint32), concatenated
    shard_NNNNN.docs.npy    each document's exclusive end offset within the shard (int64, eos included)
    shard_NNNNN.json        what the shard was made from (its pieces of the input), its token and document counts
                            and the SHA-256 of its .bin: written last, so its presence marks a finished shard
    index.json              written last of all: format and version, the tokenizer (name, which hashes a
                            tokenizer.json's bytes, and vocabulary size), the id dtype, the source and its identity,
                            the settings in the key, and every shard with its counts and SHA-256

The concatenated shards are exactly the corpus an unsharded cache held: every non-empty document of data.source in
order, each followed by eos. Shard k covers a fixed piece of the input (`bigtrain.data.source_plan.plan_shards`:
about `SHARD_BYTES` of input, cut at line, row-group or row boundaries), tokenized on its own, so the shards are
byte-identical whatever the number of worker processes, and a killed build resumes: finished shards (their .json
present and matching the plan) are kept, the others are made again. The key covers the source's identity (paths,
sizes, mtimes; a dataset's fingerprint), the tokenizer, `data.encoding_errors` and (for the embedded corpus)
`data.max_bytes`, so a changed corpus or setting gets a new folder.

One process builds a folder at a time: the builder holds an exclusive lock on `<key>.<dtype>.lock` beside it;
another process that needs the folder waits for it (saying so), then finds it finished. In a training job, global
rank 0 prepares the data while the other ranks wait at a barrier; a rank that then finds nothing (its
data.cache_dir is on a node-local disk) prepares it for its node, the lock letting one process per node build and
the others of the node wait. `docs/data.md` has the rules.

Files are written to temporary names and renamed into place, so a crash never leaves a truncated file, and
concurrent writers produce identical files. Temporary names carry the writer's host and pid
(`<final name>.<host>.<pid>.<random>.tmp`); leftovers of a killed writer on this host are removed before the next
build, never those of a live one. A failed write (disk full, read-only or unwritable cache) stops the run with the
path and sizes, leaving no partial file (and no folder, when no shard was finished).
"""

from __future__ import annotations

import array
import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import queue as queue_mod
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bigtrain.config.schema import Config, DataConfig
from bigtrain.data.shards import (
    FORMAT_VERSION,
    INDEX,
    INDEX_FORMAT,
    TokenCorpus,
    files_present,
    open_prepared,
    read_index,
    shard_name,
    token_dtype,
)
from bigtrain.data.source_plan import plan_shards
from bigtrain.data.source_reading import read_shard
from bigtrain.data.source_units import Source
from bigtrain.data.sources import open_source, source_kind, text_corpora
from bigtrain.data.tokenizer import Tokenizer, build_tokenizer
from bigtrain.errors import DataError

__all__ = ["SHARD_BYTES", "Prepared", "TokenCorpus", "data_ready", "load_corpus", "prepare_corpus", "token_dtype"]

SHARD_BYTES = 64 << 20  # input bytes per shard
_DOCS_PER_BATCH = 256
_BATCH_CHARS = 1 << 20  # a tokenizer batch ends after this many characters (or _DOCS_PER_BATCH documents)
_LINE_EVERY_S = 30.0  # progress lines when the output is not a terminal
_REPORT_EVERY_S = 0.25  # workers report progress this often


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


# --- where a source's shards are -----------------------------------------------------------------------


def corpus_folder(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[Path, Source | None]:
    """(the prepared folder of data.source, its Source); the Source is None for a folder given as data.source."""
    if source_kind(cfg.source) == "prepared":
        return Path(cfg.source), None
    source = open_source(cfg)
    settings = {"encoding_errors": cfg.encoding_errors}
    if cfg.source == "embedded":
        settings["max_bytes"] = cfg.max_bytes  # caps the embedded corpus only
    key_src = json.dumps({"v": FORMAT_VERSION, "source": source.identity, "tokenizer": tokenizer.name, **settings},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    dtype = token_dtype(tokenizer.vocab_size)
    return Path(cfg.cache_dir) / "tokens" / f"{key}.{dtype.name}", source


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer, *, workers: int | None = None) -> TokenCorpus:
    """The prepared corpus of data.source, prepared first (with `workers` processes; default: one per CPU, at most
    one per shard) if it is missing or incomplete."""
    folder, source = corpus_folder(cfg, tokenizer)
    if source is None:
        return _open_given(folder, tokenizer, cfg.tokenizer)
    corpus = _open_complete(folder, tokenizer, cfg.tokenizer)
    if corpus is not None:
        return corpus
    _prepare(folder, source, tokenizer, cfg, workers, SHARD_BYTES)
    corpus = _open_complete(folder, tokenizer, cfg.tokenizer)
    assert corpus is not None
    corpus.from_cache = False
    return corpus


def prepare_corpus(cfg: DataConfig, tokenizer: Tokenizer, workers: int | None = None,
                   shard_bytes: int = SHARD_BYTES, verify: bool = False) -> Prepared:
    """Tokenize data.source into its prepared folder (only the shards missing there); with `verify`, check every
    shard's SHA-256 against the index as well."""
    folder, source = corpus_folder(cfg, tokenizer)
    if source is None:
        _open_given(folder, tokenizer, cfg.tokenizer)
        index = read_index(folder)
        assert index is not None
        result = _summary(folder, index, built=0, seconds=0.0)
    else:
        index = read_index(folder)
        if index is not None and files_present(folder, index):
            open_prepared(folder, index, tokenizer, cfg.tokenizer, rebuildable=True)
            result = _summary(folder, index, built=0, seconds=0.0)
        else:
            result = _prepare(folder, source, tokenizer, cfg, workers, shard_bytes)
            index = read_index(folder)
            assert index is not None
    if verify:
        verify_checksums(folder, index, rebuildable=source is not None)
    return result


def data_ready(cfg: Config, tokenizer: Tokenizer) -> bool:
    """Whether every text corpus of the run (data.source, or each of data.sources) is prepared already: the
    other ranks of a job say that they wait for rank 0 only when it is not."""
    if cfg.model.family == "seq2seq":
        return True
    data = cfg.data
    for _, one in text_corpora(data):
        if source_kind(one.source) == "hf":
            return False  # knowing would mean loading the dataset (rank 0 downloads it meanwhile)
        try:
            folder, _ = corpus_folder(one, tokenizer)
            index = read_index(folder)
        except DataError:
            return False  # reported when the data is loaded
        if index is None or not files_present(folder, index):
            return False
    return True


def _open_given(folder: Path, tokenizer: Tokenizer, setting: str) -> TokenCorpus:
    """A folder given as data.source: complete, or a DataError (it cannot be rebuilt without its source)."""
    index = read_index(folder)
    assert index is not None
    missing = [str(b if not b.is_file() else d) for b, d in
               ((folder / f"{s['name']}.bin", folder / f"{s['name']}.docs.npy") for s in index["shards"])
               if not (b.is_file() and d.is_file())]
    if missing:
        raise DataError(f"data.source: the prepared folder '{folder}' lacks {len(missing)} of the shard files its "
                        f"{INDEX} lists (first: '{missing[0]}'). Copy the folder again from where it was prepared, "
                        f"or prepare its source ('{index.get('source')}') again (bigtrain prepare --config FILE).")
    return open_prepared(folder, index, tokenizer, setting, rebuildable=False)


def _open_complete(folder: Path, tokenizer: Tokenizer, setting: str) -> TokenCorpus | None:
    """The cached corpus; None when its index or a shard file is missing (then it is built)."""
    index = read_index(folder)
    if index is None or not files_present(folder, index):
        return None
    return open_prepared(folder, index, tokenizer, setting, rebuildable=True)


def _summary(folder: Path, index: dict[str, Any], built: int, seconds: float) -> Prepared:
    return Prepared(folder, index["source"], index["tokens"], index["documents"], len(index["shards"]), built,
                    index["input_bytes"], seconds, index["dtype"])


def verify_checksums(folder: Path, index: dict[str, Any], rebuildable: bool = True) -> None:
    """DataError naming the first shard whose SHA-256 differs from the index's."""
    from bigtrain.data.shards import corrupt

    for shard in index["shards"]:
        path = folder / f"{shard['name']}.bin"
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != shard["sha256"]:
            raise corrupt(path, f"its SHA-256 is {digest.hexdigest()[:16]}..., {INDEX} lists "
                                f"{shard['sha256'][:16]}...", rebuildable)


# --- building -----------------------------------------------------------------------------------------


def _prepare(folder: Path, source: Source, tokenizer: Tokenizer, cfg: DataConfig, workers: int | None,
             shard_bytes: int) -> Prepared:
    """Build what is missing of `folder` under its lock; its summary."""
    started = time.perf_counter()
    tokens_dir = folder.parent
    try:
        tokens_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot create '{tokens_dir}' ({exc}). {_write_fix(exc)}") from exc
    remove_stale_temps(tokens_dir)
    lock = _BuildLock(folder.with_name(folder.name + ".lock"), folder)
    lock.acquire()
    remove_lock = False
    try:
        index = read_index(folder)
        if index is not None and files_present(folder, index):  # built by another process while we waited
            return _summary(folder, index, built=0, seconds=time.perf_counter() - started)
        dtype = token_dtype(tokenizer.vocab_size)
        plan = plan_shards(source, shard_bytes)
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise DataError(f"data.cache_dir: cannot create '{folder}' ({exc}). {_write_fix(exc)}") from exc
        remove_stale_temps(folder)
        metas = {k: meta for k, spec in enumerate(plan) if (meta := _finished(folder, k, spec, dtype)) is not None}
        todo = [k for k in range(len(plan)) if k not in metas]
        n_workers = _worker_count(workers, len(todo), source)
        kept = f", {len(metas)} kept from an earlier run" if metas else ""
        print(f"bigtrain: preparing data.source '{source.description}' ({source.nbytes / 1e6:.1f} MB) into '{folder}': "
              f"{_count(len(plan), 'shard')}{kept}, {n_workers} worker process{'es' if n_workers > 1 else ''}",
              flush=True)
        display = _Display(sum(plan[k]["bytes"] for k in todo), len(todo), source.description)
        try:
            metas.update(_run(folder, source, tokenizer, cfg.tokenizer, dtype, plan, todo, n_workers, display))
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
        _write_file(folder / INDEX, (json.dumps(index, indent=1) + "\n").encode(), source.nbytes, dtype)
        seconds = time.perf_counter() - started
        built = len(todo)
        rate = _rate(sum(plan[k]["bytes"] for k in todo), seconds)
        print(f"bigtrain: prepared '{folder}': {index['tokens']:,} tokens, {index['documents']:,} documents in "
              f"{_count(len(shards), 'shard')} ({built} built in {seconds:.1f} s, {rate})", flush=True)
        return _summary(folder, index, built=built, seconds=seconds)
    finally:
        lock.release(remove=remove_lock)


def _worker_count(workers: int | None, todo: int, source: Source) -> int:
    if source.in_process_only:
        return 1
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(workers, todo))


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


def _run(folder: Path, source: Source, tokenizer: Tokenizer, setting: str, dtype: np.dtype,
         plan: list[dict[str, Any]], todo: list[int], workers: int, display: _Display) -> dict[int, dict[str, Any]]:
    """Build the shards `todo`, in this process or in `workers` spawned processes; their records."""
    metas: dict[int, dict[str, Any]] = {}
    if workers <= 1:
        for k in todo:
            metas[k] = build_shard(folder, k, plan[k], source, tokenizer, dtype, display.advance)
            display.shard_done(k)
        return metas
    # spawn: torch's and tokenizers' threads may be running here, so no fork; the workers import only this module
    # (never the main script: see _no_main_import).
    ctx = multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for k in todo:
        tasks.put(k)
    for _ in range(workers):
        tasks.put(None)
    job = _Job(folder, source, setting, tokenizer.name, dtype.name, plan)
    procs = [ctx.Process(target=_worker_main, args=(job, tasks, results, os.getpid()), daemon=True,
                         name=f"bigtrain-prepare-{i}") for i in range(workers)]
    try:
        with _no_main_import():
            for proc in procs:
                proc.start()
        while len(metas) < len(todo):
            try:
                kind, payload = results.get(timeout=_REPORT_EVERY_S)
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DataError(
                        f"data.source: a worker process tokenizing '{source.description}' died (exit status "
                        f"{dead[0]}; negative: killed by that signal, e.g. -9 when out of memory). Run again with "
                        f"fewer workers (bigtrain prepare --workers N): the finished shards are kept.") from None
                continue
            if kind == "progress":
                display.advance(payload)
            elif kind == "done":
                k, meta = payload
                metas[k] = meta
                display.shard_done(k)
            else:
                raise payload
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(10)
        tasks.close()
        results.close()
    return metas


@contextlib.contextmanager
def _no_main_import() -> Iterator[None]:
    """While worker processes start: hide the main module's file and spec, so that spawn does not run the main
    script again in them (a script without an `if __name__ == "__main__":` guard would start training there)."""
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        for name in saved:
            if name == "__file__":
                delattr(main, name)
            else:
                setattr(main, name, None)
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


@dataclass
class _Job:
    """What a worker process needs to build any shard of a plan."""

    folder: Path
    source: Source
    tokenizer: str  # data.tokenizer
    tokenizer_name: str  # the name the parent's tokenizer has: the worker's must be the same
    dtype: str
    plan: list[dict[str, Any]]


def _worker_main(job: _Job, tasks: Any, results: Any, parent: int) -> None:
    """A worker process: build the shards taken from `tasks` until None; progress, records and errors go to
    `results`."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    try:
        tokenizer = build_tokenizer(DataConfig(tokenizer=job.tokenizer))
        if tokenizer.name != job.tokenizer_name:
            raise DataError(f"data.tokenizer='{job.tokenizer}' loads as '{tokenizer.name}' in a worker process, "
                            f"not '{job.tokenizer_name}' as in the parent: was the file changed meanwhile?")
        dtype = np.dtype(job.dtype)
        pending = [0, time.monotonic()]

        def report(nbytes: int) -> None:
            pending[0] += nbytes
            if time.monotonic() - pending[1] >= _REPORT_EVERY_S:
                results.put(("progress", pending[0]))
                pending[:] = [0, time.monotonic()]

        while (k := tasks.get()) is not None:
            meta = build_shard(job.folder, k, job.plan[k], job.source, tokenizer, dtype, report)
            if pending[0]:
                results.put(("progress", pending[0]))
                pending[:] = [0, time.monotonic()]
            results.put(("done", (k, meta)))
    except BaseException as exc:  # every failure reaches the parent, which reports it
        results.put(("error", _picklable(exc)))


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed stops at once (its temporary files are removed by the next build)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def build_shard(folder: Path, k: int, spec: dict[str, Any], source: Source, tokenizer: Tokenizer, dtype: np.dtype,
                report: Callable[[int], None]) -> dict[str, Any]:
    """Tokenize shard k into temporary files, then rename them into place (.bin, .docs.npy, then .json); its
    record."""
    name = shard_name(k)
    tokens_path, docs_path, meta_path = (folder / f"{name}.bin", folder / f"{name}.docs.npy",
                                         folder / f"{name}.json")
    temps: list[Path] = []
    progress = _Progress()
    target = tokens_path
    try:
        try:
            tmp_tokens = _temp_name(tokens_path, temps)
            ends, digest = _write_tokens(_read(read_shard(source, spec), source.description), tokenizer, dtype,
                                         tmp_tokens, progress, report)
            target = docs_path
            tmp_docs = _temp_name(docs_path, temps)
            with open(tmp_docs, "wb") as out:
                np.save(out, np.frombuffer(ends, dtype=np.int64), allow_pickle=False)
                out.flush()
                os.fsync(out.fileno())
            meta = {"shard": k, "spec": spec, "dtype": dtype.name, "tokens": ends[-1] if ends else 0,
                    "documents": len(ends), "sha256": digest}
            target = meta_path
            tmp_meta = _temp_name(meta_path, temps)
            with open(tmp_meta, "w") as out:
                out.write(json.dumps(meta) + "\n")
                out.flush()
                os.fsync(out.fileno())
            for tmp in temps:
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by all
            os.replace(tmp_tokens, tokens_path)
            os.replace(tmp_docs, docs_path)
            os.replace(tmp_meta, meta_path)
        except OSError as exc:
            raise _write_error(exc, target, progress, source.nbytes, dtype) from exc
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return meta


def _write_file(path: Path, data: bytes, source_bytes: int, dtype: np.dtype) -> None:
    """`data` into `path` through a temporary file, atomically."""
    temps: list[Path] = []
    try:
        try:
            tmp = _temp_name(path, temps)
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(exc, path, _Progress(), source_bytes, dtype) from exc
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _read(documents: Iterator[tuple[str | None, int]], source_name: str) -> Iterator[tuple[str | None, int]]:
    """The documents, with an OSError while reading them made a DataError (not taken for a cache write error)."""
    try:
        yield from documents
    except OSError as exc:
        raise DataError(f"data.source: reading '{source_name}' failed ({exc}). Check that its files are "
                        f"readable, or point data.source elsewhere.") from exc


@dataclass
class _Progress:
    """How far a shard got: input bytes read and bytes written (for the disk-full message)."""

    read: int = 0
    written: int = 0


def _write_tokens(documents: Iterator[tuple[str | None, int]], tokenizer: Tokenizer, dtype: np.dtype, path: Path,
                  progress: _Progress, report: Callable[[int], None]) -> tuple[array.array, str]:
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


def _write_error(exc: OSError, path: Path, progress: _Progress, source_bytes: int, dtype: np.dtype) -> DataError:
    """The DataError of an OSError while writing the cache: path, error, bytes written and needed, fix."""
    if progress.read and progress.written:
        needed = int(progress.written / progress.read * source_bytes)  # ids per input byte so far, scaled
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-9) / 1e6:.1f} MB/s of input"


# --- progress -----------------------------------------------------------------------------------------


class _Display:
    """Progress of a build in input bytes: a tqdm bar (MB/s, ETA) on a terminal, else a line every 30 s."""

    def __init__(self, total: int, shards: int, label: str) -> None:
        self.total, self.shards, self.done_shards, self.done = total, shards, 0, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                            desc=f"bigtrain: tokenizing {_short(label)}", dynamic_ncols=True, smoothing=0.05,
                            postfix=f"shards 0/{shards}")

    def advance(self, nbytes: int) -> None:
        nbytes = max(0, min(nbytes, self.total - self.done))
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif time.monotonic() - self.last_line >= _LINE_EVERY_S:
            self.last_line = time.monotonic()
            elapsed = self.last_line - self.started
            rate = self.done / max(elapsed, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"bigtrain: tokenizing: {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB "
                  f"({100 * self.done / max(self.total, 1):.0f}%), shards {self.done_shards}/{self.shards}, "
                  f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f} s", flush=True)

    def shard_done(self, k: int) -> None:
        self.done_shards += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"shards {self.done_shards}/{self.shards}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]


# --- the build lock -----------------------------------------------------------------------------------


class _BuildLock:
    """An exclusive `flock` on `<folder>.lock`: one builder at a time on a host (and across hosts where the
    file system supports flock). The file names its holder; it is removed when a failed build removed the folder.
    Where the file system has no flock, builds go on unlocked (rank 0 + the barrier still keep one builder per
    job; concurrent builders write identical files)."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path, self.folder, self.fd = path, folder, None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise DataError(f"data.cache_dir: cannot create '{self.path}' ({exc}). {_write_fix(exc)}") from exc
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    print(f"bigtrain: waiting for {holder} to finish preparing '{self.folder}' ...", flush=True)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return  # no locks on this file system
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that a failed builder removed while we waited for it
                break
            os.close(fd)
        self.fd = fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


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
