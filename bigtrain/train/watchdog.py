"""A thread that turns hangs and orphaned ranks into errors.

Hang: the training loop calls `beat()` whenever it makes progress (a step, an evaluation, a save). When nothing
beats for `train.hang_timeout` seconds, the watchdog writes every thread's Python stack to
`run.dir/hang-rank<R>.txt`, says so on stderr, and exits the rank with HANG_EXIT (4), which the Slurm scripts
requeue. A rank stuck in a collective because another rank hangs times out the same way, so every rank of a
hung job leaves its stacks behind.

Orphan: a rank started by a launcher (torchrun, DeepSpeed's, accelerate, mpirun, srun) whose launcher dies is
re-parented; it would otherwise train on alone until its next collective times out. The watchdog notices the
new parent within a few seconds and exits the rank (ORPHAN_EXIT, 5).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

HANG_EXIT = 4
ORPHAN_EXIT = 5
# Launchers whose ranks are their children: a rank whose launcher is gone stops.
LAUNCHERS_THAT_SPAWN = ("torchrun", "deepspeed", "accelerate", "mpi", "slurm")


class Watchdog:
    def __init__(self, hang_timeout: float, stack_dir: Path, rank: int, watch_parent: bool,
                 poll_s: float = 2.0) -> None:
        self.hang_timeout, self.stack_dir, self.rank = hang_timeout, stack_dir, rank
        self.parent = os.getppid() if watch_parent else None
        self.poll_s = min(poll_s, hang_timeout / 4) if hang_timeout > 0 else poll_s
        self.last_beat = time.monotonic()
        self.what = "start-up"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bigtrain-watchdog", daemon=True)

    @property
    def needed(self) -> bool:
        return self.hang_timeout > 0 or self.parent is not None

    def start(self) -> Watchdog:
        if self.needed:
            self._thread.start()
        return self

    def beat(self, what: str) -> None:
        """Progress was made; `what` comes next (named in the report if it hangs)."""
        self.last_beat, self.what = time.monotonic(), what

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            if self.parent is not None and os.getppid() != self.parent:
                self._exit(ORPHAN_EXIT, f"the launcher that started this rank (pid {self.parent}) is gone; stopping "
                                        f"instead of training on alone. Restart the job; it resumes from the latest "
                                        f"checkpoint.")
            idle = time.monotonic() - self.last_beat
            if self.hang_timeout > 0 and idle > self.hang_timeout:
                path = self._dump_stacks(idle)
                self._exit(HANG_EXIT, f"no progress for {idle:.0f} s during {self.what} (train.hang_timeout="
                                      f"{self.hang_timeout:g}); every thread's stack is in {path}. The job exits so "
                                      f"that it can be restarted (it resumes from the latest checkpoint); raise "
                                      f"train.hang_timeout if steps are really that slow.")

    def _dump_stacks(self, idle: float) -> Path | str:
        path = self.stack_dir / f"hang-rank{self.rank}.txt"
        try:
            self.stack_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"rank {self.rank}: no progress for {idle:.0f} s during {self.what}\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            return path
        except OSError:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            return "stderr (run.dir was not writable)"

    def _exit(self, status: int, message: str) -> None:
        try:
            print(f"bigtrain: rank {self.rank}: error: {message}", file=sys.stderr, flush=True)
        except OSError:
            pass
        os._exit(status)
