"""Console output that a closed pipe cannot kill: `launch/train.py … | head -n 2` must not end the training.

After the first write to a closed stdout (BrokenPipeError), console output is dropped: the stream's file
descriptor is pointed at /dev/null, so neither later prints nor the interpreter's final flush fail. metrics.jsonl,
TensorBoard and checkpoints are unaffected.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO


class ConsoleStream:
    """Wraps a text stream; writes after the reader went away are dropped silently."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.gone = stream, False

    def _drop(self) -> None:
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to redirect
            pass

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except OSError as exc:
                if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EPIPE:
                    raise
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except OSError as exc:
                if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EPIPE:
                    raise
                self._drop()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def resilient_stdout() -> Iterator[None]:
    """Within the block, sys.stdout survives a closed pipe (see the module docstring)."""
    before = sys.stdout
    sys.stdout = ConsoleStream(before)  # type: ignore[assignment]
    try:
        yield
    finally:
        try:
            sys.stdout.flush()
        finally:
            sys.stdout = before
