"""Checkpoints in `run.dir/checkpoints/`: one directory per step, made visible only when complete.

A save writes `step_NNNNNNNN.tmp/`, fsyncs it, adds `manifest.json` (every file's size and SHA-256 and the layout
that wrote it, `integrity.py`), renames it to `step_NNNNNNNN/` and then atomically replaces the `latest` pointer.
A crash at any point leaves the previous `latest` pointing at a complete checkpoint. Files are loaded with the
weights-only unpickler (`bigtrain.io.load_torch`): no pickled code runs.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.checkpoint.integrity import step_dirs, write_latest, write_manifest
from bigtrain.config.layout import Layout
from bigtrain.errors import CheckpointError
from bigtrain.io import WriteFailed, fsync_dir, fsync_file


def rng_state() -> dict[str, Any]:
    """Every random generator a step may draw from (dropout uses torch's)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def begin_checkpoint(directory: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step` (every rank writes its files there)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def writing(where: Path) -> Iterator[None]:
    """A failed write under `where` (disk full, file too large, no permission; torch reports a full disk as
    "unexpected pos") becomes a CheckpointError naming the file (`where` when the error names none), the free
    space and, where known, what the file needed."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "unexpected pos" not in str(exc) and "write" not in str(exc).lower():
            raise
        path = Path(exc.filename) if isinstance(exc, OSError) and exc.filename else where
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB are free there"
        except OSError:
            free = "the free space could not be read"
        needed = exc.needed if isinstance(exc, WriteFailed) else None
        need = f"; this file alone needs about {needed / 2**20:.1f} MiB" if needed else ""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"Could not write the checkpoint file {path} ({reason}): the disk is probably full or the file too "
            f"large for this process (ulimit -f); {free}{need}. Free space, or point run.dir at a disk with room. "
            f"The previous checkpoint is intact and `latest` still names it.") from None


def commit_checkpoint(tmp: Path, config_yaml: str, keep: int, layout: Layout,
                      known: dict[str, dict[str, Any]] | None = None) -> Path:
    """Make a fully written temporary checkpoint visible: checksum its files into `manifest.json` (with the
    layout that wrote it), rename it, then move the `latest` pointer. `known`: sizes and SHA-256 of files already
    fsynced and hashed by their writers (an asynchronous save), by their names in the checkpoint."""
    directory = tmp.parent
    final = directory / tmp.name.removesuffix(".tmp")
    known = known or {}
    (tmp / "config.yaml").write_text(config_yaml)
    for path in tmp.rglob("*"):  # DeepSpeed writes its own files; make sure all of them are on disk
        if path.is_file() and path.relative_to(tmp).as_posix() not in known:
            fsync_file(path)
    write_manifest(tmp, int(final.name.removeprefix("step_")), layout, known)
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a re-run); replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(directory)
    write_latest(directory, final.name)
    fsync_dir(directory)
    _prune(directory, keep, protect=final.name)
    return final


def _prune(directory: Path, keep: int, protect: str) -> None:
    """Delete complete checkpoints older than the newest `keep` (never `protect`, never ones moved aside as
    damaged), and temporary folders of interrupted saves."""
    for old in step_dirs(directory)[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob("step_*.tmp"):
        if stale.is_dir() and stale.name.removesuffix(".tmp") != protect:
            shutil.rmtree(stale, ignore_errors=True)
