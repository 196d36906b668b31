"""`launch/train.py` with an injected failure: rank BIGTRAIN_TEST_FAIL_RANK raises at step 2."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigtrain.cli.train import run_train  # noqa: E402
from bigtrain.data.loader import TrainingData  # noqa: E402

_micro_batches = TrainingData.micro_batches


def _failing(self, step):
    if step == 2 and self.rank == int(os.environ["BIGTRAIN_TEST_FAIL_RANK"]):
        raise RuntimeError("injected failure")
    return _micro_batches(self, step)


TrainingData.micro_batches = _failing

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
