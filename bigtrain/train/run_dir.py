"""The run directory: checked before any work, and held by one run at a time.

`prepare_run_dir` refuses, in one paragraph naming the path, a run.dir that is too long for the file system, is
a file, or cannot be created or written. `RunLock` is held by the live run (rank 0) for its whole life: an
advisory lock (`flock`) on `run.dir/.lock`, which also records who holds it (host, pid, start time, command).
A second run on the same run.dir is refused at once, naming the holder. The operating system drops the lock
when its process dies, however it dies, so a lock left by a killed run is taken over, with a note. (On a shared
file system the lock works where `flock` does: local disks, NFSv4, Lustre with flock enabled.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from bigtrain.errors import RunDirError

LOCK = ".lock"


def prepare_run_dir(run_dir: Path) -> None:
    """Create run.dir (and parents) and make sure a file can be written in it."""
    name_max = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    too_long = [part for part in run_dir.parts if len(part.encode()) > name_max]
    if too_long or len(str(run_dir.resolve()).encode()) > 4000:
        what = f"the name {too_long[0][:40]!r}… has {len(too_long[0].encode())} bytes (at most {name_max})" \
            if too_long else f"the path has {len(str(run_dir.resolve()).encode())} bytes"
        raise RunDirError(f"run.dir '{str(run_dir)[:120]}…' is too long for the file system: {what}. Choose a "
                          f"shorter run.dir.")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.dir '{run_dir}' is a file, not a directory. Choose another run.dir, or move the "
                          f"file away.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        reason = {errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only",
                  errno.ENOSPC: "the disk is full", errno.ENOTDIR: "a part of the path is a file"}.get(
            exc.errno, exc.strerror or str(exc))
        raise RunDirError(f"run.dir '{run_dir}' cannot be written: {reason} ({exc.filename or run_dir}). Choose a "
                          f"run.dir where this user can write, with free space.") from None


class RunLock:
    """The lock of one run.dir, held from `acquire` until `release` (or the process's end)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self.fd: int | None = None
        self.note: str | None = None  # set when a lock left by a dead run was taken over

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _describe(_read(fd))
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirError(f"run.dir '{self.path.parent}' is in use by another run ({holder}). Wait for it to "
                                  f"end or stop it, or use another run.dir.") from None
            raise
        previous = _read(fd)
        if previous:
            self.note = (f"took over the lock of {self.path.parent} from a run that ended without releasing it "
                         f"({_describe(previous)})")
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Clear the holder's record and drop the lock (a clean end leaves no stale-lock note behind)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(info: dict) -> str:
    if not info or info.get("unreadable"):
        return "holder unknown"
    return (f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}, "
            f"command: {info.get('command', '?')[:200]}")
