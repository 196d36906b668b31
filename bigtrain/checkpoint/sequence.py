"""Writing the layout-free form into a checkpoint being saved, and reading one back, for any engine; the save
sequence every multi-rank engine shares."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.layout_free import FOLDER, LayoutFreeReader, write_index, write_pieces
from bigtrain.checkpoint.state import StateAdapter
from bigtrain.errors import CheckpointError


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


def restore_layout_free(adapter: StateAdapter, checkpoint: Path) -> dict[str, Any]:
    """Set the engine's state from `checkpoint`'s layout-free form; returns its header (trainer state, ...)."""
    reader = LayoutFreeReader(checkpoint / FOLDER)
    try:
        adapter.restore(reader, float(reader.header["optimizer"]["step"]))
    finally:
        reader.close()
    return reader.header


def save_from_every_rank(directory: Path, step: int, rank: int, world_size: int, trainer_state: dict[str, Any],
                         config_yaml: str, keep: int, write_own: Callable[[Path], None],
                         adapter: Callable[[], StateAdapter], layout_free: dict[str, Any] | None) -> Path:
    """A checkpoint written by every rank of a multi-rank engine: rank 0 opens `step_N.tmp/`, each rank writes
    its engine's own files (`write_own(tmp)`), its trainer state and RNG, and its layout-free pieces; rank 0
    makes the directory visible once all ranks are done (a barrier of the whole world around each phase)."""
    import torch.distributed as dist

    tmp = directory / (ckpt.step_dir_name(step) + ".tmp")
    if rank == 0:
        ckpt.begin_checkpoint(directory, step)
    dist.barrier()
    try:
        write_own(tmp)
        ckpt.write_part(tmp, f"trainer_rank{rank:05d}",
                        {"state": trainer_state, "rng": ckpt.rng_state(), "world_size": world_size})
        if layout_free is not None:
            with ckpt.writing(tmp / "layout_free"):
                write_layout_free(tmp, adapter(), rank, world_size, layout_free, barrier=dist.barrier)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)  # the other ranks stop at their next collective
        raise
    dist.barrier()  # every rank's files are written
    if rank == 0:
        ckpt.commit_checkpoint(tmp, config_yaml, keep)
    dist.barrier()
    return directory / ckpt.step_dir_name(step)
