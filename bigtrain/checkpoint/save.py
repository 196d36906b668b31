"""The one save sequence, for every engine and any number of ranks, and the layout-free form inside it.

    1. rank 0 opens `step_N.tmp/`                                               (then a barrier of every rank)
    2. every rank: the engine's own files (`engine.write_native`), its trainer state and RNG
       (`trainer_rankNNNNN.pt`), and, when asked, its layout-free pieces; rank 0 writes the layout-free index
       once every rank's pieces are written
    3. rank 0 commits: config.yaml, the manifest with every file's checksum and the layout, the rename to
       `step_N/`, the `latest` pointer                                          (a barrier before and after)

A failed write (a full disk) removes the temporary folder and ends in one paragraph naming the file; the other
ranks stop at their next collective. With one process the barriers are nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigtrain.checkpoint import store
from bigtrain.checkpoint.joined_qkv import JoinedQKVReader
from bigtrain.checkpoint.layout_free import FOLDER, LayoutFreeReader, write_index, write_pieces
from bigtrain.checkpoint.saved import trainer_file
from bigtrain.checkpoint.state import StateAdapter
from bigtrain.config import ModelConfig
from bigtrain.config.layout import Layout
from bigtrain.engine.base import Engine
from bigtrain.errors import CheckpointError
from bigtrain.io import save_torch


def write_trainer_record(folder: Path, rank: int, record: dict[str, Any]) -> None:
    """Rank `rank`'s trainer state and RNG."""
    save_torch(folder / trainer_file(rank), record)


def write_layout_free(tmp: Path, adapter: StateAdapter, rank: int, world_size: int, header: dict[str, Any],
                      barrier: Callable[[], None]) -> None:
    """Every rank writes the pieces it owns (and a note of them); after `barrier`, rank 0 writes the index that
    completes the layout-free form (`header` plus the optimizer's step count)."""
    folder = tmp / FOLDER
    entry = write_pieces(folder, rank, adapter.pieces())
    (folder / f"rank{rank:05d}.json").write_text(json.dumps(entry))
    barrier()
    if rank == 0:
        notes = [folder / f"rank{r:05d}.json" for r in range(world_size)]
        entries = [json.loads(note.read_text()) for note in notes]
        header = {**header, "optimizer": {**header.get("optimizer", {}), "step": adapter.optimizer_step()}}
        write_index(folder, entries, header)
        for note in notes:  # all in the index now
            note.unlink()


def restore_layout_free(adapter: StateAdapter, checkpoint: Path, separate_qkv: ModelConfig | None = None
                        ) -> dict[str, Any]:
    """Set the engine's state from `checkpoint`'s layout-free form; returns its header (trainer state, ...).
    `separate_qkv`: the model config of a checkpoint whose Q, K, V are three parameters (read joined)."""
    reader: Any = LayoutFreeReader(checkpoint / FOLDER)
    if separate_qkv is not None:
        reader = JoinedQKVReader(reader, separate_qkv)
    try:
        adapter.restore(reader, float(reader.header["optimizer"]["step"]))
    finally:
        reader.close()
    return reader.header


def save_checkpoint(directory: Path, step: int, engine: Engine, layout: Layout, rank: int,
                    barrier: Callable[[], None], trainer_state: dict[str, Any], config_yaml: str, keep: int,
                    layout_free: dict[str, Any] | None) -> Path:
    """Write the checkpoint of `step` (every rank calls this; see the module docstring); `layout_free`: the index
    header of the layout-free form, or None to write without it."""
    tmp = directory / (store.step_dir_name(step) + ".tmp")
    if rank == 0:
        store.begin_checkpoint(directory, step)
    barrier()
    try:
        with store.writing(tmp / "(the engine's own files)"):
            engine.write_native(tmp)
            write_trainer_record(tmp, rank, {"state": trainer_state, "rng": store.rng_state(),
                                             "world_size": layout.world_size})
        if layout_free is not None:
            with store.writing(tmp / FOLDER):
                write_layout_free(tmp, StateAdapter(engine.sharded_state()), rank, layout.world_size, layout_free,
                                  barrier)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)  # the other ranks stop at their next collective
        raise
    barrier()  # every rank's files are written
    if rank == 0:
        store.commit_checkpoint(tmp, config_yaml, keep, layout)
    barrier()
    return directory / store.step_dir_name(step)
