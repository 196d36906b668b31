"""Checkpoints in `run.dir/checkpoints/`: one directory per step, made visible only when complete.

A save writes `step_NNNNNNNN.tmp/`, fsyncs it, adds `manifest.json` (every file's size and SHA-256,
`integrity.py`), renames it to `step_NNNNNNNN/` and then atomically replaces the `latest` pointer (write to a
temp file, fsync, os.replace). A crash at any point leaves the previous `latest` pointing at a complete
checkpoint. Files are loaded with `weights_only=True`: no pickled code runs.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bigtrain.checkpoint.integrity import step_dirs, write_latest, write_manifest
from bigtrain.config import Config
from bigtrain.config.loader import config_from_dict
from bigtrain.errors import BigtrainError, CheckpointError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    path = tmp / f"{name}.pt"
    with writing(path, needed=_tensor_bytes(obj)):
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


@contextlib.contextmanager
def writing(path: Path, needed: int | None = None) -> Iterator[None]:
    """A failed write under `path` (disk full, file too large, no permission; torch reports a full disk as
    "unexpected pos") becomes a CheckpointError naming the file, the free space and what is needed."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "unexpected pos" not in str(exc) and "write" not in str(exc).lower():
            raise
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB are free there"
        except OSError:
            free = "the free space could not be read"
        need = f"; this file alone needs about {needed / 2**20:.1f} MiB" if needed else ""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"Could not write the checkpoint file {path} ({reason}): the disk is probably full or the file too "
            f"large for this process (ulimit -f); {free}{need}. Free space, or point run.dir at a disk with room. "
            f"The previous checkpoint is intact and `latest` still names it.") from None


def commit_checkpoint(tmp: Path, config_yaml: str, keep: int) -> Path:
    """Make a fully written temporary checkpoint visible: checksum its files into `manifest.json`, rename it,
    then move the `latest` pointer."""
    directory = tmp.parent
    final = directory / tmp.name.removesuffix(".tmp")
    (tmp / "config.yaml").write_text(config_yaml)
    for path in tmp.rglob("*"):  # DeepSpeed writes its own files; make sure all of them are on disk
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    write_manifest(tmp, int(final.name.removeprefix("step_")))
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a re-run); replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    write_latest(directory, final.name)
    _fsync_dir(directory)
    _prune(directory, keep, protect=final.name)
    return final


def save_checkpoint(directory: Path, step: int, parts: dict[str, Any], config_yaml: str, keep: int,
                    before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write `parts` (name -> state object) as `<name>.pt` plus config.yaml (and whatever `before_commit` adds
    to the temporary folder); then point `latest` at it."""
    tmp = begin_checkpoint(directory, step)
    try:
        for name, obj in parts.items():
            write_part(tmp, name, obj)
        if before_commit is not None:
            with writing(tmp / "layout_free"):
                before_commit(tmp)
        return commit_checkpoint(tmp, config_yaml, keep)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; `latest` was not moved
        raise


def _prune(directory: Path, keep: int, protect: str) -> None:
    """Delete complete checkpoints older than the newest `keep` (never `protect`, never ones moved aside as
    damaged), and temporary folders of interrupted saves."""
    for old in step_dirs(directory)[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob("step_*.tmp"):
        if stale.is_dir() and stale.name.removesuffix(".tmp") != protect:
            shutil.rmtree(stale, ignore_errors=True)


def load_part(checkpoint: Path, name: str, map_location: str | torch.device = "cpu") -> Any:
    path = checkpoint / f"{name}.pt"
    if not path.exists():
        raise CheckpointError(f"Checkpoint {checkpoint} has no {name}.pt; it is incomplete, or was written by "
                              f"another engine or program. Resume with the engine that wrote it, or use a new "
                              f"run.dir.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects that weights_only refuses
        raise CheckpointError(f"Cannot read {path}: {exc}. The file is corrupt or was not written by "
                              f"bigtrain.") from None


def ranks_that_wrote(checkpoint: Path) -> int:
    """How many ranks wrote a checkpoint: one `trainer_rankNNNNN.pt` each (multi-rank engines), else 1."""
    return max(1, len(list(checkpoint.glob("trainer_rank*.pt"))))


def saved_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state (step, tokens, ...) saved in `checkpoint` by any engine, read without the model."""
    part = "trainer" if (checkpoint / "trainer.pt").exists() else "trainer_rank00000"
    state = load_part(checkpoint, part).get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{checkpoint / (part + '.pt')} holds no trainer state; the checkpoint is damaged "
                              f"or was not written by bigtrain.")
    return state


def load_into(module: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """`module.load_state_dict(state)` with a mismatch (missing, unexpected or differently shaped parameters)
    reported as a CheckpointError naming the file and the first differences."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()][:3]
        raise CheckpointError(f"{path} does not fit this model ({' '.join(lines)[:400]}). The checkpoint was "
                              f"written for another model or vocabulary: resume with the settings that wrote it, "
                              f"or use a new run.dir.") from None


def saved_config(checkpoint: Path) -> tuple[Config, int]:
    """The config that wrote `checkpoint` and the number of ranks that wrote it."""
    path = checkpoint / "config.yaml"
    world = ranks_that_wrote(checkpoint)
    try:
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a mapping of sections")
        return config_from_dict(raw, world_size=world), world
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, BigtrainError) as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"{path} cannot be read as the config of that checkpoint ({type(exc).__name__}: "
                              f"{reason[:300]}). The checkpoint is damaged: remove {checkpoint} (or point "
                              f"{checkpoint.parent / 'latest'} at an older step), or use a new run.dir.") from None
