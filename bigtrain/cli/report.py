"""How every command ends when something goes wrong: one paragraph on stderr and an exit status.

    BigtrainError (bad config, data, checkpoint, ...)  "bigtrain: error: <message>"           exit 2
    OSError (disk full, permissions, path too long)     "bigtrain: error: <what, which path>"  exit 2
    anything else (a bug, a broken environment)         "bigtrain: error: <type>: <message>"   exit 1

Tracebacks are printed only with `--debug`. With several ranks the failing rank exits at once (`os._exit`): the
others may be blocked in a collective that would keep it waiting at interpreter shutdown; the launcher sees the
status and stops them, and their next collective fails fast.

Bad input that every rank reads alike (the command line, the config) fails on every rank before any process
group exists; it is printed once, by rank 0 (`everywhere=True`). The other ranks wait up to
`SAME_ERROR_GRACE_S` for the launcher, which stops them when rank 0 exits, and print their own message only if it
has not (their input differed after all): neither a message per rank nor none, which is what exiting at once would
risk (the launcher could stop rank 0 before it printed).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bigtrain.errors import BigtrainError

BAD_INPUT, BUG = 2, 1
SAME_ERROR_GRACE_S = 15.0  # torchrun and DeepSpeed's launcher stop the other ranks within a second or so

# {place}: what the user chooses instead -- run.dir / data.cache_dir for training, or the command's output option
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there, or choose another {place} on a disk with room",
    errno.EDQUOT: "the disk quota is used up: free space, or choose another {place} elsewhere",
    errno.EACCES: "permission denied: make the path writable, or choose another {place}",
    errno.EPERM: "operation not permitted: make the path writable, or choose another {place}",
    errno.EROFS: "the file system is read-only: choose another {place} on a writable one",
    errno.ENAMETOOLONG: "the path is too long for the file system: choose a shorter {place}",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another {place}",
    errno.EEXIST: "a file is in the way: remove it or choose another path",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f) or the file system allows",
}
TRAINING_PLACES = "run.dir / data.cache_dir"


def _place(filename: object, outputs: dict[str, object] | None) -> str:
    """What to choose instead of the path that failed: the output option it lies under, else any path; for
    training (no `outputs`) run.dir or data.cache_dir."""
    if outputs is None:
        return TRAINING_PLACES
    if filename is not None:
        failed = Path(os.path.abspath(os.fsdecode(filename)))
        for option, where in outputs.items():
            if where is not None and failed.is_relative_to(os.path.abspath(os.fsdecode(where))):
                return option
    return "path"


def describe(err: BaseException, outputs: dict[str, object] | None = None) -> tuple[str, int]:
    """(one-paragraph message, exit status) for an exception that ended a command; `outputs`: the command's
    output options and their paths ({"--out": Path}), named by the advice for a path that cannot be written."""
    if isinstance(err, BigtrainError):
        return " ".join(str(err).split("\n")), BAD_INPUT
    if isinstance(err, OSError) and err.errno in _OS_ADVICE:
        where = f" ({err.filename})" if err.filename else ""
        advice = _OS_ADVICE[err.errno].format(place=_place(err.filename, outputs))
        return f"{err.strerror or err}{where}: {advice}.", BAD_INPUT
    text = " ".join(str(err).split())[:600]
    return f"{type(err).__name__}: {text} (rerun with --debug for the traceback)", BUG


def fail(err: BaseException, rank: int = 0, world_size: int = 1, debug: bool = False, everywhere: bool = False,
         outputs: dict[str, object] | None = None) -> int:
    """Report `err` as one paragraph (its traceback too with `debug`) and return (or, with several ranks, exit
    with) its status. `everywhere`: every rank meets the same error (the module docstring); `outputs`: the
    command's output options and their paths, which the advice for an unwritable path names (`describe`)."""
    message, status = describe(err, outputs)
    if everywhere and world_size > 1 and rank != 0:
        _leave_it_to_rank_0()
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    where = f"rank {rank}: " if world_size > 1 else ""
    try:
        print(f"bigtrain: {where}error: {message}", file=sys.stderr, flush=True)
    except OSError:  # stderr closed: the status still tells
        pass
    if world_size > 1:
        try:
            sys.stdout.flush()
        except OSError:
            pass
        os._exit(status)
    return status


def _leave_it_to_rank_0() -> None:
    """Wait (bounded) for the launcher to stop this process, as it does once rank 0 exits with the error; the
    launcher's SIGTERM / SIGINT end it at once (no stop-after-the-step handling here)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
    time.sleep(SAME_ERROR_GRACE_S)


def run_guarded(command: Callable[[], int], debug: bool, outputs: dict[str, object] | None = None) -> int:
    """Run a one-process command (`consolidate`, `evaluate`, ...) under the same error handling as training;
    `outputs`: its output options and their paths (`fail`)."""
    try:
        return command()
    except KeyboardInterrupt as err:  # Ctrl-C; or a stop signal that ended the processes a command started
        signum = getattr(err, "signum", None)
        how = f" by {err} (the processes it started were ended)" if signum else ""
        print(f"bigtrain: interrupted{how}.", file=sys.stderr)
        return getattr(err, "status", 130)
    except Exception as err:  # every failure ends in one paragraph
        return fail(err, debug=debug, outputs=outputs)
