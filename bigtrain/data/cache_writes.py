"""Writing the token cache safely: files go to temporary names beside their final ones and are renamed into place
(`write_file`, `temp_name`), a killed writer's leftovers are removed (`remove_stale_temps`), and a failed write
becomes a DataError with the path, the bytes written and about how many the cache needs (`write_error`).

Temporary names carry the writer's host and pid (`<final name>.<host>.<pid>.<random>.tmp`). The room a finished cache
needs is estimated from the shard being written as written / read × the source's input bytes (until that shard has
read and written bytes: input bytes × the id size, at most one id per byte with the byte tokenizer).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigtrain.errors import DataError
from bigtrain.io import umask_mode


def write_file(path: Path, data: bytes, source_bytes: int, dtype: np.dtype) -> None:
    """`data` into `path` through a temporary file, atomically."""
    temps: list[Path] = []
    try:
        try:
            tmp = temp_name(path, temps)
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(exc, path, WriteProgress(), source_bytes, dtype) from exc
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()


@dataclass
class WriteProgress:
    """How far a shard got: input bytes read and bytes written (for the disk-full message)."""

    read: int = 0
    written: int = 0


def write_error(exc: OSError, path: Path, progress: WriteProgress, source_bytes: int, dtype: np.dtype) -> DataError:
    """The DataError of an OSError while writing the cache: path, error, bytes written and needed, fix."""
    if progress.read and progress.written:
        needed = int(progress.written / progress.read * source_bytes)  # ids per input byte so far, scaled
    else:
        needed = source_bytes * dtype.itemsize  # at most one id per byte with the byte tokenizer
    return DataError(
        f"data.cache_dir: writing the token cache '{path}' failed ({exc}) after {_size(progress.written)} "
        f"written; the finished cache needs about {_size(needed)}. {write_fix(exc)} The temporary files were "
        f"removed.")


def write_fix(exc: OSError) -> str:
    """How to fix an OSError on the cache directory, by errno."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free disk space there, or set data.cache_dir to a directory on a disk with room."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Make that folder writable, or set data.cache_dir to a writable directory."
    if exc.errno == errno.ENAMETOOLONG:
        return "Set data.cache_dir to a shorter path."
    return "Check the disk, or set data.cache_dir to another writable directory."


def _size(nbytes: int) -> str:
    return f"{nbytes} bytes" if nbytes < 1 << 20 else f"{nbytes / (1 << 20):.1f} MiB"


def _writer_tag() -> str:
    """This host in temporary names: the host name without dots, plus the Linux PID namespace if known.

    The namespace keeps containers that share a host name, but not process ids, from taking each other's
    writers for dead.
    """
    tag = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
    with contextlib.suppress(OSError):
        tag += "-" + "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    return tag


def temp_name(path: Path, temps: list[Path]) -> Path:
    """A fresh temporary file beside `path` named for its writer, recorded in `temps` for cleanup, with the mode
    the umask gives (mkstemp makes it 0600: teammates sharing a cache could not read it)."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{_writer_tag()}.{os.getpid()}.",
                                    suffix=".tmp")
    except OSError as exc:
        raise DataError(f"data.cache_dir: cannot write in '{path.parent}' ({exc}). {write_fix(exc)}") from exc
    with contextlib.suppress(OSError):
        os.fchmod(fd, umask_mode())
    os.close(fd)
    temps.append(Path(name))
    return temps[-1]


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files in `folder` whose writer ran on this host and is gone; the removed paths.

    Files of live writers, of other hosts, and names this module did not make are kept.
    """
    tag, removed = _writer_tag(), []
    for path in folder.glob("*.tmp"):
        parts = path.name.rsplit(".", 4)  # final name, host tag, pid, random part, "tmp"
        if len(parts) != 5 or parts[1] != tag or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        try:
            path.unlink()
        except OSError:  # another cleaner was first, or the folder is not ours to change
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return True  # not a process id: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, owned by someone else
    return True
