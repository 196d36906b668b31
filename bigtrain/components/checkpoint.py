"""Checkpoints in `run.dir/checkpoints/`: one directory per step, made visible only when complete.

A save writes `step_NNNNNNNN.tmp/`, fsyncs it, renames it to `step_NNNNNNNN/` and then atomically replaces
the `latest` pointer (write to a temp file, fsync, os.replace). A crash at any point leaves the previous
`latest` pointing at a complete checkpoint. Files are loaded with `weights_only=True`: no pickled code runs.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.errors import CheckpointError

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def write_part(tmp: Path, name: str, obj: Any) -> None:
    """Save one state object as `<name>.pt`, flushed to disk."""
    with open(tmp / f"{name}.pt", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def commit_checkpoint(tmp: Path, config_yaml: str, keep: int) -> Path:
    """Make a fully written temporary checkpoint visible: rename it, then move the `latest` pointer."""
    directory = tmp.parent
    final = directory / tmp.name.removesuffix(".tmp")
    (tmp / "config.yaml").write_text(config_yaml)
    for path in tmp.rglob("*"):  # DeepSpeed writes its own files; make sure all of them are on disk
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a re-run); replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    _write_atomic(directory / LATEST, final.name + "\n")
    _prune(directory, keep, protect=final.name)
    return final


def save_checkpoint(directory: Path, step: int, parts: dict[str, Any], config_yaml: str, keep: int) -> Path:
    """Write `parts` (name -> state object) as `<name>.pt` plus config.yaml; then point `latest` at it."""
    tmp = begin_checkpoint(directory, step)
    for name, obj in parts.items():
        write_part(tmp, name, obj)
    return commit_checkpoint(tmp, config_yaml, keep)


def _prune(directory: Path, keep: int, protect: str) -> None:
    complete = sorted(p for p in directory.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint `latest` points to, or None if the run has none yet."""
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    target = directory / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} points to {target.name}, which does not exist. Delete the pointer to "
                              f"start over, or point it at one of: "
                              f"{', '.join(p.name for p in sorted(directory.glob('step_*'))) or 'none'}.")
    return target


def load_part(checkpoint: Path, name: str, map_location: str | torch.device = "cpu") -> Any:
    path = checkpoint / f"{name}.pt"
    if not path.exists():
        raise CheckpointError(f"Checkpoint {checkpoint} has no {name}.pt; it is incomplete or from another "
                              f"program. Remove it or point {checkpoint.parent / LATEST} at another step.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects that weights_only refuses
        raise CheckpointError(f"Cannot read {path}: {exc}. The file is corrupt or was not written by "
                              f"bigtrain.") from None


def ranks_that_wrote(checkpoint: Path) -> int:
    """How many ranks wrote a checkpoint: one `trainer_rankNNNNN.pt` each (multi-rank engines), else 1."""
    return max(1, len(list(checkpoint.glob("trainer_rank*.pt"))))
