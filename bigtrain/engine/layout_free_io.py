"""Writing the layout-free form into a checkpoint being saved, and reading one back, for any engine."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigtrain.components.layout_free import FOLDER, LayoutFreeReader, write_index, write_pieces
from bigtrain.engine.layout_free_state import StateAdapter


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
