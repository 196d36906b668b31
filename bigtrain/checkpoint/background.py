"""Asynchronous saves (`checkpoint.async: true`): the save sequence of `save.py` cut where training may go on.

    training thread, at the save step (every rank)           the rank's background writer thread
    1. rank 0 opens step_N.tmp/                 (a barrier)
    2. capture, into host memory (`snapshot.py`): the
       engine's own files (DeepSpeed's collectives run
       here, as in a synchronous save), the trainer record,
       the layout-free pieces and the optimizer's step
    3. start the writer; training goes on ─────────────────> 4. write each file (torch.save / safetensors,
                                                                fsynced) and its size and SHA-256; the
                                                                layout-free note; last, `written_rankNNNNN.json`
                                                                with every checksum. No collective, ever.
    5. at each step boundary while a save is in flight: one all-reduce on the host group counts the writers
       still running and those that failed. None running: rank 0 writes the layout-free index and commits
       (manifest from the noted checksums, rename, `latest`, `store.commit_checkpoint`), its outcome broadcast.
       One failed: every rank raises, naming the rank and its error; rank 0 removes step_N.tmp/.

Every collective stays on the training thread, in the same order on every rank, so none can interleave with the
training step's collectives on the same process group. The files are byte for byte those of a synchronous save:
the same objects are serialized the same way, from copies that are the same views of copied storages.

`BIGTRAIN_TEST_KILL_DURING_ASYNC_WRITE=N` (tests only): the writer of the checkpoint of step N SIGKILLs its own
process after its first file: a crash in the middle of a background write, before `latest` moves.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bigtrain.checkpoint import store
from bigtrain.checkpoint.layout_free import FOLDER, Piece, write_index, write_pieces
from bigtrain.checkpoint.save import write_trainer_record
from bigtrain.checkpoint.snapshot import HostCopies, HostPool
from bigtrain.checkpoint.state import StateAdapter
from bigtrain.config.layout import Layout
from bigtrain.engine.base import Engine
from bigtrain.errors import CheckpointError
from bigtrain.io import save_torch, sha256_of

KILL_ENV = "BIGTRAIN_TEST_KILL_DURING_ASYNC_WRITE"
WRITTEN = "written_rank{:05d}.json"


class BackgroundSave:
    """One rank's checkpoint of one step: captured in host memory, written by a thread of its own."""

    def __init__(self, tmp: Path, step: int, rank: int, copies: HostCopies, pieces: list[Piece] | None,
                 header: dict[str, Any] | None) -> None:
        self.tmp, self.step, self.rank, self.copies, self.pieces = tmp, step, rank, copies, pieces
        self.header = header  # the layout-free index header (with the optimizer's step), None without the form
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"bigtrain-checkpoint-{step}", daemon=True)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def start(self) -> BackgroundSave:
        self.thread.start()
        return self

    def wait(self) -> float:
        """Wait for the writer; the seconds waited."""
        start = time.perf_counter()
        self.thread.join()
        return time.perf_counter() - start

    def _run(self) -> None:
        try:
            self._write()
        except BaseException as exc:  # surfaced on the training thread (`settle`), never lost
            self.error = exc
        finally:
            self.copies.release()  # the host copies go as soon as they are on disk
            self.pieces = None

    def _write(self) -> None:
        self.copies.ready()
        kill = os.environ.get(KILL_ENV, "") == str(self.step)
        written: dict[str, dict[str, Any]] = {}
        with store.writing(self.tmp / "(the engine's own files)"):
            for path, obj, by_name in self.copies.files:
                save_torch(path, obj, by_name)
                written[path.relative_to(self.tmp).as_posix()] = {"bytes": path.stat().st_size,
                                                                  "sha256": sha256_of(path)}
                if kill:  # tests: a crash in the middle of the write
                    os.kill(os.getpid(), signal.SIGKILL)
        if self.pieces is not None:
            folder = self.tmp / FOLDER
            with store.writing(folder):
                entry = write_pieces(folder, self.rank, self.pieces)
                (folder / f"rank{self.rank:05d}.json").write_text(json.dumps(entry))
            written[f"{FOLDER}/{entry['file']}"] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}
        with store.writing(self.tmp / WRITTEN.format(self.rank)):
            (self.tmp / WRITTEN.format(self.rank)).write_text(json.dumps(written))


def capture(directory: Path, step: int, engine: Engine, layout: Layout, rank: int, barrier: Any,
            trainer_state: dict[str, Any], layout_free: dict[str, Any] | None, pool: HostPool) -> BackgroundSave:
    """Steps 1-3 of the module docstring (every rank calls this): the rank's checkpoint in host memory (storages
    from `pool`), its writer started."""
    tmp = directory / (store.step_dir_name(step) + ".tmp")
    if rank == 0:
        store.begin_checkpoint(directory, step)
    barrier()
    copies = HostCopies(pool)
    engine.write_native(tmp, copies.save)
    write_trainer_record(tmp, rank, {"state": trainer_state, "rng": store.rng_state(),
                                     "world_size": layout.world_size}, copies.save)
    pieces, header = None, None
    if layout_free is not None:
        adapter = StateAdapter(engine.sharded_state())
        pieces = [replace(p, data=copies.copy(p.data.detach())) for p in adapter.pieces()]
        header = {**layout_free, "optimizer": {**layout_free.get("optimizer", {}), "step": adapter.optimizer_step()}}
    return BackgroundSave(tmp, step, rank, copies, pieces, header).start()


def commit(save: BackgroundSave, world_size: int, config_yaml: str, keep: int, layout: Layout) -> Path:
    """Rank 0, once every rank's writer is done: the layout-free index from the ranks' notes, then the commit of
    `store.commit_checkpoint` with the checksums the writers noted (no file is read again)."""
    tmp = save.tmp
    known: dict[str, dict[str, Any]] = {}
    for r in range(world_size):
        note = tmp / WRITTEN.format(r)
        known.update(json.loads(note.read_text()))
        note.unlink()
    if save.header is not None:
        folder = tmp / FOLDER
        notes = [folder / f"rank{r:05d}.json" for r in range(world_size)]
        write_index(folder, [json.loads(note.read_text()) for note in notes], save.header)
        for note in notes:
            note.unlink()
    return store.commit_checkpoint(tmp, config_yaml, keep, layout, known)


def failure(errors: list[tuple[int, str]], step: int) -> CheckpointError:
    """The error every rank raises when a writer failed: which ranks, and why."""
    said = "; ".join(f"rank {r}: {message}" for r, message in errors)
    return CheckpointError(f"The background write of the checkpoint of step {step} failed ({said}). The previous "
                           f"checkpoint is intact and `latest` still names it.")


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
