"""Files on disk: written whole or not at all, flushed to the disk, read back without running code, hashed.

    replace_text(path, text)      write `path.tmp`, fsync, rename over `path` (a reader sees the old or the new)
    save_torch(path, obj)         torch.save, flushed and fsynced; a failed write names the file (`WriteFailed`)
    save_safetensors(path, t)     safetensors' save_file, the same way, with the mode the umask gives
    load_torch(path)              torch.load with the weights-only unpickler: no code stored in a file runs
    load_failure(exc)             why a load failed, in words that never advise turning that protection off
    load_state(module, state)     module.load_state_dict, a mismatch reported as one paragraph naming the file
    sha256_of(path)               the file's SHA-256, read in 8 MiB chunks
    confined(folder, name, ...)   `folder / name` for a file name read from an index, manifest or pointer, only
                                  when it lies inside `folder` (symlinks resolved)
    umask_mode()                  the mode a new file gets under this process's umask (0644 under 022)

A leaf: it imports nothing of bigtrain but its errors, and torch only inside the functions that need it (the
data preparation workers hash files without torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bigtrain.errors import BigtrainError, CheckpointError

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


def confined(folder: Path, name: Any, listed_in: Path, fix: str, error: type[BigtrainError] = CheckpointError,
             follow_links: bool = True) -> Path:
    """`folder / name` for a file name read from `listed_in` (an index, a manifest, a pointer), when it names a
    file inside `folder`: a relative path that stays inside once `..` and symlinks are resolved. Anything else (an
    absolute path, `../x`, a link out of the folder, not a string) is `error`, one paragraph naming the file that
    lists it, the name and `fix`; nothing outside is read. `follow_links=False` judges the spelling alone: for
    folders whose files are links into a store beside them by design (Hugging Face's cache)."""
    path = folder / name if isinstance(name, str) and name and "\0" not in name else None
    if path is not None:
        if follow_links:
            inside, where = path.resolve(), folder.resolve()
        else:
            inside, where = Path(os.path.normpath(os.path.abspath(path))), Path(os.path.abspath(folder))
        if inside != where and inside.is_relative_to(where):
            return path
    shown = repr(name)[:120]
    raise error(f"{listed_in} names the file {shown}, which is not inside {folder}: every file it lists must lie in "
                f"that folder, so it was altered or crafted, and nothing outside was read. {fix}")


def umask_mode() -> int:
    """The permission bits a file created now gets (0o666 less the umask): what bigtrain gives every file it
    writes, also those a library creates private (safetensors writes 0600)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and putting it back at once)
    os.umask(mask)
    return 0o666 & ~mask


class WriteFailed(OSError):
    """A file could not be written whole (disk full, a file-size limit, no permission): its path, why, and how
    many bytes it needed where known."""

    def __init__(self, path: Path, reason: str, needed: int | None = None, code: int | None = None) -> None:
        super().__init__(code, reason, str(path))
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


class SaveFile(Protocol):
    """Writes one object into a file as `save_torch` does (or defers the writing: an asynchronous checkpoint)."""

    def __call__(self, path: Path, obj: Any, by_name: Callable[[Any, str], None] | None = None) -> None: ...


def save_torch(path: Path, obj: Any, by_name: Callable[[Any, str], None] | None = None) -> None:
    """`torch.save(obj)` into `path`, flushed to disk; a failed write is a `WriteFailed` naming the file and the
    bytes it needed (torch reports a full disk as "unexpected pos"). `by_name(obj, str(path))`: how a library
    saves by file name instead (DeepSpeed's checkpoint engine; torch.save names the archive inside the file after
    it, so the bytes differ from a save into an open file)."""
    import torch

    try:
        if by_name is not None:
            by_name(obj, str(path))
            fsync_file(path)
            return
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "unexpected pos" not in str(exc) and "write" not in str(exc).lower():
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200]
        raise WriteFailed(path, reason, tensor_bytes(obj)) from None


def save_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file` into `path`, fsynced, with the mode the umask gives (safetensors makes it 0600);
    a failed write (its `SafetensorError ... (os error 28)`) is a `WriteFailed` naming the file and its bytes."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
        fsync_file(path)
    except Exception as exc:  # SafetensorError (not an OSError) carries the OS error only in its text
        text = " ".join(str(exc).split())
        code = re.search(r"os error (\d+)", text)
        if not isinstance(exc, OSError) and code is None:
            raise
        number = exc.errno if isinstance(exc, OSError) else int(code.group(1))
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else
                  os.strerror(number) if number else text[:200])
        raise WriteFailed(path, reason, tensor_bytes(tensors), number) from None
    with contextlib.suppress(OSError):  # a file system without modes keeps its own
        os.chmod(path, umask_mode())


REFUSED = re.compile(r"GLOBAL ([\w.]+)")  # torch: "Unsupported global: GLOBAL posix.system ..."
LOADED_FILE = "bigtrain_loaded_file"  # set on a load's exception by `compat.torch.weights_only_loading`


def load_failure(exc: BaseException) -> str:
    """Why loading a file failed, for a one-paragraph message (naming the file when a library loaded it): a
    pickle the weights-only unpickler refused is said to hold objects that are not plain data (naming the first),
    refused so that nothing in it ran; torch's own text, which reads as advice to turn that protection off, is
    never shown. Anything else: its type and text."""
    text = " ".join(str(exc).split())
    file = getattr(exc, LOADED_FILE, None)
    where = f"{file}: " if file else ""
    if "weights only load failed" in text.lower() or "weights_only" in text:
        found = REFUSED.search(text)
        what = f" ({found.group(1)})" if found else ""
        return (f"{where}it holds objects that are not plain data{what}, which bigtrain refuses to load: nothing "
                f"stored in it ran")
    return f"{where}{type(exc).__name__}: {text[:300]}"


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
        raise CheckpointError(f"Cannot read {path} ({load_failure(exc)}). The file is corrupt, altered, or was not "
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
