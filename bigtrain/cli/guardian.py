"""`python -m bigtrain.cli.guardian MARKER [FOLDER ...]`: what ends a command's processes when the command itself
cannot (it was SIGKILLed).

A command that starts processes (`bigtrain.cli.launching.Launch`) starts this first, in a session of its own, with
a pipe as its standard input whose only writer is the command. End of file on it means the command has ended, in
whatever way: then every process carrying MARKER (`bigtrain.cli.lifetime`) is SIGKILLed and the FOLDERs (the
command's temporary folders) are removed. A command that ends normally has done both already; this finds nothing
left and exits. It imports nothing heavy, and ignores the terminal's signals (its work is the last that runs).
"""

from __future__ import annotations

import shutil
import signal
import sys

from bigtrain.cli.lifetime import end_marked


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    marker, folders = argv[0], argv[1:]
    sys.stdin.buffer.read()  # returns at end of file: the command has ended
    end_marked(marker)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
