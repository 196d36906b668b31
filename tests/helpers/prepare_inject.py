"""`bigtrain prepare ...` with an injected fault (tests/test_prepare.py):

    BIGTRAIN_TEST_KILL_AFTER_SHARDS=N   the command SIGKILLs itself once N shards are finished (a kill mid-build),
                                        first writing the pids of its worker processes, one a line, to
                                        BIGTRAIN_TEST_WORKER_PIDS if that names a file
    BIGTRAIN_TEST_SHARD_GATE=PATH       every shard waits until PATH exists (at most 60 s) before it is built: a build
                                        that holds the lock until the test lets it go on
"""

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigtrain.cli import main  # noqa: E402
from bigtrain.data import build_progress, shard_workers  # noqa: E402

KILL_AFTER = int(os.environ.get("BIGTRAIN_TEST_KILL_AFTER_SHARDS", "0"))
WORKER_PIDS = os.environ.get("BIGTRAIN_TEST_WORKER_PIDS")
GATE = os.environ.get("BIGTRAIN_TEST_SHARD_GATE")

if KILL_AFTER:
    _shard_done = build_progress.ProgressDisplay.shard_done

    def _kill_after(self, k):
        _shard_done(self, k)
        if self.done_shards >= KILL_AFTER:
            if WORKER_PIDS:
                Path(WORKER_PIDS).write_text("".join(f"{p.pid}\n" for p in multiprocessing.active_children()))
            os.kill(os.getpid(), signal.SIGKILL)

    build_progress.ProgressDisplay.shard_done = _kill_after

if GATE:
    _build_shard = shard_workers.build_shard

    def _gated(*args, **kwargs):
        deadline = time.monotonic() + 60
        while not os.path.exists(GATE) and time.monotonic() < deadline:
            time.sleep(0.05)
        return _build_shard(*args, **kwargs)

    shard_workers.build_shard = _gated

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
