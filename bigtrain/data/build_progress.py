"""The progress of a build in input bytes: a tqdm bar (MB/s, ETA) on a terminal, else a line every 30 s with
the rate r = bytes done / seconds elapsed and ETA = bytes left / r."""

from __future__ import annotations

import sys
import time

_LINE_EVERY_S = 30.0  # progress lines when the output is not a terminal


class ProgressDisplay:
    """Progress of a build in input bytes: a tqdm bar (MB/s, ETA) on a terminal, else a line every 30 s."""

    def __init__(self, total: int, shards: int, label: str) -> None:
        self.total, self.shards, self.done_shards, self.done = total, shards, 0, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                            desc=f"bigtrain: tokenizing {_short(label)}", dynamic_ncols=True, smoothing=0.05,
                            postfix=f"shards 0/{shards}")

    def advance(self, nbytes: int) -> None:
        nbytes = max(0, min(nbytes, self.total - self.done))
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif time.monotonic() - self.last_line >= _LINE_EVERY_S:
            self.last_line = time.monotonic()
            elapsed = self.last_line - self.started
            rate = self.done / max(elapsed, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"bigtrain: tokenizing: {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB "
                  f"({100 * self.done / max(self.total, 1):.0f}%), shards {self.done_shards}/{self.shards}, "
                  f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f} s", flush=True)

    def shard_done(self, k: int) -> None:
        self.done_shards += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"shards {self.done_shards}/{self.shards}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]
