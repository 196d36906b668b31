"""Building the missing shards of a plan (`build_shards`): in this process, or in spawned worker processes that take
shard numbers from a queue and send back progress, records and errors.

Worker processes import this module (and what it imports) only, never the main script, and it loads without torch.
A worker whose parent is gone stops at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_mod
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigtrain.config.schema import DataConfig
from bigtrain.data.build_progress import ProgressDisplay
from bigtrain.data.shard_build import build_shard
from bigtrain.data.source_units import Source
from bigtrain.data.tokenizer import Tokenizer, build_tokenizer
from bigtrain.errors import DataError

_REPORT_EVERY_S = 0.25  # workers report progress this often


def worker_count(workers: int | None, todo: int, source: Source) -> int:
    """Worker processes for `todo` shards: max(1, min(workers, todo)), `workers` defaulting to the CPUs this process
    may use; 1 for a dataset held in memory only (workers cannot open it)."""
    if source.in_process_only:
        return 1
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(workers, todo))


def build_shards(folder: Path, source: Source, tokenizer: Tokenizer, setting: str, dtype: np.dtype,
                 plan: list[dict[str, Any]], todo: list[int], workers: int,
                 display: ProgressDisplay) -> dict[int, dict[str, Any]]:
    """Build the shards `todo`, in this process or in `workers` spawned processes; their records."""
    metas: dict[int, dict[str, Any]] = {}
    if workers <= 1:
        for k in todo:
            metas[k] = build_shard(folder, k, plan[k], source, tokenizer, dtype, display.advance)
            display.shard_done(k)
        return metas
    # spawn: torch's and tokenizers' threads may be running here, so no fork; the workers import only this module
    # and what it imports (never the main script: see _no_main_import).
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
