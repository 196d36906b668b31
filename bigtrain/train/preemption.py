"""Stop cleanly on SIGUSR1 / SIGTERM: finish the current step, save a checkpoint, exit.

Clusters warn a job before they end it: Slurm sends `--signal=USR1@<seconds>` before the time limit (and
`scancel --signal=USR1`), and SIGTERM on preemption or cancellation, SIGKILL `KillWait` seconds later. The
handler only records the signal; the training loop asks at every step boundary whether any rank got one (one
all-reduce of a single integer), so all ranks stop after the same step and write one checkpoint together.

Exit status of a run stopped this way: REQUEUE_EXIT (3) after SIGUSR1 -- "saved, requeue me", which
slurm/train.sbatch answers with `scontrol requeue` -- and 128 + 15 after SIGTERM, the status of a process
ended by SIGTERM, so a cancelled job stays cancelled. Re-running the same command resumes from the checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEUE_EXIT = 3


class StopRequest:
    """Records the stop signals this process receives (after `install`) until `uninstall`."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: int = 0  # the last signal number received; 0: none
        self._previous: dict[int, object] = {}

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
        if not self.received:
            print(f"bigtrain: received {signal.Signals(signum).name}: stopping after the current step and saving "
                  f"a checkpoint", file=sys.stderr, flush=True)
        self.received = max(self.received, signum)

    def agreed(self, device: torch.device | None) -> int:
        """The signal any rank received (0 if none); a collective over all ranks when `device` is given, so
        every rank stops after the same step. SIGTERM (15) outranks SIGUSR1 (10): a job that is going away is
        not requeued."""
        if device is None or not torch.distributed.is_initialized():
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def exit_status(signum: int) -> int:
    """The process exit status of a run stopped by `signum` after saving its checkpoint."""
    return REQUEUE_EXIT if signum == signal.SIGUSR1 else 128 + signum
