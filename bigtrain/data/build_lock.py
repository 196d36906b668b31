"""The build lock of a prepared folder: one process builds `<key>.<dtype>/` at a time, holding an exclusive lock on
`<key>.<dtype>.lock` beside it; another that needs the folder waits for it (saying so), then finds it finished."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from bigtrain.data.cache_writes import write_fix
from bigtrain.errors import DataError


class BuildLock:
    """An exclusive `flock` on `<folder>.lock`: one builder at a time on a host (and across hosts where the
    file system supports flock). The file names its holder; it is removed when a failed build removed the folder.
    Where the file system has no flock, builds go on unlocked (rank 0 + the barrier still keep one builder per
    job; concurrent builders write identical files)."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path, self.folder, self.fd = path, folder, None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise DataError(f"data.cache_dir: cannot create '{self.path}' ({exc}). {write_fix(exc)}") from exc
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    print(f"bigtrain: waiting for {holder} to finish preparing '{self.folder}' ...", flush=True)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return  # no locks on this file system
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that a failed builder removed while we waited for it
                break
            os.close(fd)
        self.fd = fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None
