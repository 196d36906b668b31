"""Files on disk: written whole or not at all, flushed to the disk, read back without running code, hashed.

    replace_text(path, text)      write `path.tmp`, fsync, rename over `path` (a reader sees the old or the new)
    save_torch(path, obj)         torch.save, flushed and fsynced; a failed write names the file (`WriteFailed`)
    load_torch(path)              torch.load with the weights-only unpickler: no code stored in a file runs
    load_state(module, state)     module.load_state_dict, a mismatch reported as one paragraph naming the file
    sha256_of(path)               the file's SHA-256, read in 8 MiB chunks

A leaf: it imports nothing of bigtrain but its errors, and torch only inside the functions that need it (the
data preparation workers hash files without torch).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from bigtrain.errors import CheckpointError

CHUNK = 8 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a temporary beside it, flushed to disk, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WriteFailed(OSError):
    """A file could not be written whole (disk full, a file-size limit, no permission): its path, why, and how
    many bytes it needed where known."""

    def __init__(self, path: Path, reason: str, needed: int | None = None) -> None:
        super().__init__(None, reason, str(path))
        self.needed = needed


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in `obj` (nested dicts, lists and tuples)."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch(path: Path, obj: Any) -> None:
    """`torch.save(obj)` into `path`, flushed to disk; a failed write is a `WriteFailed` naming the file and the
    bytes it needed (torch reports a full disk as "unexpected pos")."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "unexpected pos" not in str(exc) and "write" not in str(exc).lower():
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200]
        raise WriteFailed(path, reason, tensor_bytes(obj)) from None


def load_torch(path: Path, map_location: Any = "cpu") -> Any:
    """What `save_torch` wrote, read by the weights-only unpickler; a missing, damaged or foreign file is a
    CheckpointError naming it."""
    import torch

    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, or was written by another engine "
                              f"or program. Resume with the engine that wrote it, or use a new run.dir.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects that weights_only refuses
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"Cannot read {path} ({type(exc).__name__}: {reason}). The file is corrupt or was not "
                              f"written by bigtrain.") from None


def load_state(module: Any, state: dict[str, Any], path: Path) -> None:
    """`module.load_state_dict(state)` with a mismatch (missing, unexpected or differently shaped parameters)
    reported as a CheckpointError naming the file and the first differences."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()][:3]
        raise CheckpointError(f"{path} does not fit this model ({' '.join(lines)[:400]}). The checkpoint was "
                              f"written for another model or vocabulary: resume with the settings that wrote it, "
                              f"or use a new run.dir.") from None
