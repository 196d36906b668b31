"""`launch/train.py` with a fault only tests switch on (for `bigtrain parity --script`): the last rank reads the
batches of the next step instead of its own (a wrong data position on one rank), so the layout no longer
computes what one device computes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigtrain.cli import run_train  # noqa: E402
from bigtrain.train import trainer  # noqa: E402

_host_micro_batches = trainer.Trainer.host_micro_batches


def shifted(self, step):
    last = self.env.world_size > 1 and self.env.rank == self.env.world_size - 1
    return _host_micro_batches(self, step + 1 if last else step)


trainer.Trainer.host_micro_batches = shifted

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
