"""`launch/train.py` with a fault only tests switch on (for `bigtrain parity --script`): the last rank reads the
batches of the next step instead of its own (a wrong data position on one rank), so the layout no longer
computes what one device computes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from bigtrain.cli.train import run_train  # noqa: E402
from bigtrain.data.loader import TrainingData  # noqa: E402

_host_micro_batches = TrainingData.host_micro_batches


def shifted(self, step):
    world = dist.get_world_size() if dist.is_initialized() else 1
    last = world > 1 and self.rank == world - 1
    return _host_micro_batches(self, step + 1 if last else step)


TrainingData.host_micro_batches = shifted

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
