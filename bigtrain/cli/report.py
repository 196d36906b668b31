"""How every command ends when something goes wrong: one paragraph on stderr and an exit status.

    BigtrainError (bad config, data, checkpoint, ...)  "bigtrain: error: <message>"           exit 2
    OSError (disk full, permissions, path too long)     "bigtrain: error: <what, which path>"  exit 2
    anything else (a bug, a broken environment)         "bigtrain: error: <type>: <message>"   exit 1

Tracebacks are printed only with `--debug`. With several ranks the failing rank exits at once (`os._exit`): the
others may be blocked in a collective that would keep it waiting at interpreter shutdown; the launcher sees the
status and stops them, and their next collective fails fast.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable

from bigtrain.errors import BigtrainError

BAD_INPUT, BUG = 2, 1

_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there, or point run.dir / data.cache_dir at a disk with room",
    errno.EDQUOT: "the disk quota is used up: free space, or point run.dir / data.cache_dir elsewhere",
    errno.EACCES: "permission denied: make the path writable, or choose another run.dir / data.cache_dir",
    errno.EPERM: "operation not permitted: make the path writable, or choose another run.dir / data.cache_dir",
    errno.EROFS: "the file system is read-only: choose a run.dir / data.cache_dir on a writable one",
    errno.ENAMETOOLONG: "the path is too long for the file system: choose a shorter run.dir / data.cache_dir",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another run.dir / data.cache_dir",
    errno.EEXIST: "a file is in the way: remove it or choose another path",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f) or the file system allows",
}


def describe(err: BaseException) -> tuple[str, int]:
    """(one-paragraph message, exit status) for an exception that ended a command."""
    if isinstance(err, BigtrainError):
        return " ".join(str(err).split("\n")), BAD_INPUT
    if isinstance(err, OSError) and err.errno in _OS_ADVICE:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror or err}{where}: {_OS_ADVICE[err.errno]}.", BAD_INPUT
    text = " ".join(str(err).split())[:600]
    return f"{type(err).__name__}: {text} (rerun with --debug for the traceback)", BUG


def fail(err: BaseException, rank: int = 0, world_size: int = 1, debug: bool = False) -> int:
    """Report `err` as one paragraph (its traceback too with `debug`) and return (or, with several ranks, exit
    with) its status."""
    message, status = describe(err)
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


def run_guarded(command: Callable[[], int], debug: bool) -> int:
    """Run a one-process command (`consolidate`, `evaluate`, ...) under the same error handling as training."""
    try:
        return command()
    except KeyboardInterrupt:
        print("bigtrain: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # every failure ends in one paragraph
        return fail(err, debug=debug)
