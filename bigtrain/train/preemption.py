"""Stop cleanly on SIGUSR1 / SIGTERM / SIGINT: finish the current step, save a checkpoint, exit.

Clusters warn a job before they end it: Slurm sends `--signal=USR1@<seconds>` before the time limit (and
`scancel --signal=USR1`), and SIGTERM on preemption or cancellation, SIGKILL `KillWait` seconds later. The
handler only records the signal; the training loop asks at every step boundary whether any rank got one (one
all-reduce of a single integer), so all ranks stop after the same step and write one checkpoint together.

Ctrl-C (SIGINT) is handled like SIGTERM: the run saves at the end of the current step. A second Ctrl-C aborts at
once (KeyboardInterrupt), and the command says that nothing new was saved and which checkpoint is the latest.

Exit status of a run stopped this way: REQUEUE_EXIT (3) after SIGUSR1 -- "saved, requeue me", which
slurm/train.sbatch answers with `scontrol requeue` -- and 128 + N after signal N (143 after SIGTERM, 130 after
SIGINT), the status of a process ended by it, so a cancelled job stays cancelled. Re-running the same command
resumes from the checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable

import torch

from bigtrain.distributed.groups import ParallelGroups

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# When ranks received different signals, the highest priority wins (signal numbers differ between systems: on
# BSD and macOS SIGUSR1 is 30, above SIGTERM's 15): a job that is going away, or that a user stops, is not requeued.
PRIORITY = {signal.SIGUSR1: 1, signal.SIGINT: 2, signal.SIGTERM: 3}
BY_PRIORITY = {rank: sig for sig, rank in PRIORITY.items()}
REQUEUE_EXIT = 3


class StopRequest:
    """Records the stop signals this process receives (after `install`) until `uninstall`."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int = 0  # the signal of highest priority received (`PRIORITY`); 0: none
        self.interrupts = 0  # SIGINTs received
        self.aborted = False  # a second Ctrl-C raised KeyboardInterrupt (wherever it landed, even inside a save)
        self._previous: dict[int, object] = {}
        self.saved_note = "No checkpoint of this run exists yet: a re-run starts over."

    def note_checkpoint(self, step: int, path: object) -> None:
        """Record the latest complete checkpoint, for the message of an abort."""
        self.saved_note = f"The latest complete checkpoint is step {step} ({path}); the same command resumes from it."

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                self.aborted = True
                raise KeyboardInterrupt  # the second Ctrl-C: abort now, without saving
        if not self.received:
            again = "; press Ctrl-C again to abort without saving" if signum == signal.SIGINT else ""
            _say(f"bigtrain: received {signal.Signals(signum).name}: stopping after the current step and saving a "
                 f"checkpoint{again}")
        if PRIORITY.get(signum, 0) > PRIORITY.get(self.received, 0):
            self.received = signum

    def agreed(self, groups: ParallelGroups | None) -> int:
        """The signal any rank received (0 if none), of the highest priority; with `groups`, one all-reduce over
        every rank on the host group, so every rank stops after the same step and asking never waits for a
        device."""
        if groups is None:
            return self.received
        flag = torch.tensor([PRIORITY.get(self.received, 0)], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=groups.host_world)
        return int(BY_PRIORITY.get(int(flag.item()), 0))


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:  # a closed stderr must not turn a stop into a crash
        pass


def exit_status(signum: int) -> int:
    """The process exit status of a run stopped by `signum` after saving its checkpoint."""
    return REQUEUE_EXIT if signum == signal.SIGUSR1 else 128 + signum
