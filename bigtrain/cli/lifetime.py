"""How long the processes a command starts may live: no longer than the command.

Every process a command starts (`bigtrain.cli.launching.Launch`) carries a marker in its environment,
`BIGTRAIN_LAUNCH_ID=<command pid>-<random>`, which every process below it inherits (torchrun, its ranks, their
helpers). Three things end them:

    the command itself      on every way out (return, exception, SIGINT / SIGTERM / SIGHUP): `end_marked`
    the guardian            a process the command starts first, in a session of its own; when the command dies
                            even by SIGKILL, it does the same (`bigtrain.cli.guardian`)
    the kernel              a process started by a bigtrain command or by torchrun / DeepSpeed's launcher /
                            accelerate asks, as its first act, for SIGKILL when its parent dies
                            (`die_with_launcher`: PR_SET_PDEATHSIG), so a rank still starting up dies with its
                            launcher too

Processes are found by their marker in /proc/<pid>/environ (the environment a process started with; readable for
one's own processes), whatever their process group or session: torchrun starts each rank in a session of its own.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time
from collections.abc import Iterable
from pathlib import Path

MARKER = "BIGTRAIN_LAUNCH_ID"  # set by a bigtrain command in the environment of everything it starts
COMMAND_PID = "BIGTRAIN_LAUNCHER_PID"  # the pid of that command
PR_SET_PDEATHSIG = 1
# Launchers whose ranks are their own children and should not outlive them: torchrun (and accelerate, which runs
# torchrun's agent), DeepSpeed's launcher (it sets CROSS_RANK), and bigtrain's own commands. Ranks of mpirun and
# srun are left to their process managers and to the watchdog (bigtrain/train/watchdog.py).
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK", MARKER)


def _prctl():
    """libc's prctl, or None where there is none (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # looked up once, so that a child set up between fork and exec calls no dlsym


def die_with_parent(parent: int | None = None) -> None:
    """Ask for SIGKILL when this process's parent dies; exit now if it already died (it may have while this process
    started: then the request would never fire). `parent`: the pid the parent must have (a child being set up
    between fork and exec knows it); by default the parent at the time of the call."""
    if _PRCTL is None:
        return
    parent = os.getppid() if parent is None else parent
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def die_with_launcher() -> None:
    """In a process a launcher started (`LAUNCHER_VARS`): die with the launcher, from now on or at once when it is
    gone already, or when the bigtrain command above it is gone. Nothing elsewhere. Call it first, before heavy
    imports: a rank killed while it imports torch then dies with the rest."""
    if not any(name in os.environ for name in LAUNCHER_VARS):
        return
    die_with_parent()
    command = os.environ.get(COMMAND_PID, "")
    if command.isdigit() and not _alive(int(command)):
        os._exit(1)  # the command died before this process could ask: its guardian is ending everything


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (the pid was reused)
        return True
    return True


def marked(marker: str, exclude: Iterable[int] = ()) -> list[int]:
    """The pids of the live processes whose environment carries `MARKER=marker` (zombies have no environment)."""
    needle = f"{MARKER}={marker}".encode()
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def wait_for_exit(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait (woken by each exit: a pidfd per process) until `pids` have ended, at most `timeout` s; the ones left."""
    deadline, left = time.monotonic() + timeout, []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                left.append(pid)
        finally:
            os.close(fd)
    return left


def end_marked(marker: str, groups: Iterable[int] = (), exclude: Iterable[int] = (), timeout: float = 30.0) -> int:
    """SIGKILL the process groups `groups` (so that no launcher among them starts another rank), then every process
    carrying `marker`, until none is left (a process forked meanwhile is found by the next look); the count ended."""
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    ended: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := marked(marker, exclude)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ended.update(pids)
        wait_for_exit(pids, max(0.0, deadline - time.monotonic()))
    return len(ended)
