"""How a command starts processes of its own (`bigtrain parity`'s runs, `bigtrain convert`'s ranks), and how they
end with it.

What they run: the same Python and the same bigtrain as the command itself, whether it runs from a checkout or an
installed wheel, one intra-op thread per CPU rank unless the environment says otherwise, under torchrun on a free
local port (`child_env`, `torchrun`).

How long they live (`Launch`, with `bigtrain.cli.lifetime`): no longer than the command. Each started process runs
in a process group of its own, asks for SIGKILL when the command dies, and carries the command's marker, as does
everything below it. When the `with Launch(...)` block is left — normally, by an exception, or by SIGINT, SIGTERM
or SIGHUP (which end the command with status 128 + the signal's number, `Stopped`) — every marked process is
killed and the command's temporary folders are removed; when the command is SIGKILLed, its guardian does the same
(`bigtrain.cli.guardian`). Check the machine's room first (`bigtrain.cli.capacity.check_local_ranks`): `Launch`
starts what it is given.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import bigtrain
from bigtrain.cli.lifetime import COMMAND_PID, MARKER, die_with_parent, end_marked

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def child_env() -> dict[str, str]:
    """This environment, with this bigtrain first on the module path and OMP_NUM_THREADS defaulting to 1."""
    here = str(Path(bigtrain.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": path}


def torchrun(ranks: int, log_dir: Path | None = None) -> list[str]:
    """The start of a command line that runs `ranks` local ranks under torchrun (then a script, or `-m MODULE`);
    `log_dir`: where torchrun keeps its files (else a new /tmp/torchelastic_* folder it never removes)."""
    from bigtrain.distributed.rendezvous import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *([f"--log-dir={log_dir}"] if log_dir else [])]


class Stopped(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived while a command ran processes (they are ended by then); the command exits
    with `status`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.status = signum, 128 + signum


class Launch:
    """`with Launch(temporary=[...]) as launch: launch.run(cmd)`: processes that end with the block, and with the
    command however it ends; the `temporary` folders are removed at the end too."""

    def __init__(self, temporary: Sequence[Path] = ()) -> None:
        self.temporary = [Path(p) for p in temporary]
        self.scratch = Path()  # a temporary folder of its own, for torchrun's files (made on entry)
        self.marker = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.groups: list[int] = []
        self.guardian: subprocess.Popen | None = None
        self._handlers: dict[int, object] = {}
        self._ending, self._late = False, 0

    def torchrun(self, ranks: int) -> list[str]:
        """`torchrun(ranks)` keeping its files in this launch's scratch folder (removed at the end)."""
        return torchrun(ranks, self.scratch / "torchrun")

    def env(self) -> dict[str, str]:
        """`child_env` with this launch's marker and the command's pid, unbuffered output."""
        return {**child_env(), MARKER: self.marker, COMMAND_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1"}

    def __enter__(self) -> Launch:
        if threading.current_thread() is threading.main_thread():
            self._handlers = {signum: signal.signal(signum, self._stop) for signum in STOP_SIGNALS}
        try:
            self.scratch = Path(tempfile.mkdtemp(prefix="bigtrain-launch-"))
            self.temporary.append(self.scratch)
            self.guardian = subprocess.Popen(
                [sys.executable, "-m", "bigtrain.cli.guardian", self.marker, *map(str, self.temporary)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=child_env(), start_new_session=True)
        except BaseException:
            self._end()
            raise
        return self

    def _stop(self, signum: int, frame: object) -> None:
        if not self._ending:
            raise Stopped(signum)
        self._late = self._late or signum  # while ending: raised once everything is ended

    def run(self, cmd: Sequence[str], on_line: Callable[[str], None] | None = None,
            env: dict[str, str] | None = None) -> tuple[int, list[str]]:
        """Run `cmd` to its end in a process group of its own; (exit status, the last 200 lines of its output).
        With `on_line`, its output (stdout and stderr) is read line by line and handed to it; else it goes where
        this command's does (and no lines are returned). `env`: variables added to its environment."""
        pipe = subprocess.PIPE if on_line else None
        proc = subprocess.Popen(list(cmd), env={**self.env(), **(env or {})}, start_new_session=True,
                                preexec_fn=functools.partial(die_with_parent, os.getpid()), stdout=pipe,
                                stderr=subprocess.STDOUT if on_line else None, text=True, errors="replace")
        self.groups.append(proc.pid)
        lines: deque[str] = deque(maxlen=200)
        try:
            if on_line:
                for line in proc.stdout:
                    lines.append(line.rstrip("\n"))
                    on_line(line)
            status = proc.wait()
        finally:
            end_marked(self.marker, [proc.pid], self._keep())  # what the run left behind (or all of it, on error)
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        return status, list(lines)

    def _keep(self) -> list[int]:
        return [self.guardian.pid] if self.guardian else []

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self._end()
        if self._late and kind is None:
            raise Stopped(self._late)

    def _end(self) -> None:
        """End every marked process, remove the temporary folders, let the guardian go, restore the handlers."""
        self._ending = True
        try:
            end_marked(self.marker, self.groups, self._keep())
            for folder in self.temporary:
                shutil.rmtree(folder, ignore_errors=True)
            if self.guardian is not None:
                self.guardian.stdin.close()  # end of file: it looks, finds nothing left, and exits
                self.guardian.wait()
        finally:
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
