"""`launch/train.py` with failures injected on one rank, chosen by environment variables (for the tests that
show what bigtrain does when things go wrong):

    BIGTRAIN_TEST_RANK=R            the rank that misbehaves (default 0)
    BIGTRAIN_TEST_NAN_STEPS=3,4     its loss is NaN in these (1-based) steps
    BIGTRAIN_TEST_SLEEP_STEP=S      it sleeps (hangs) inside step S
    BIGTRAIN_TEST_KILL_SAVE=S       it SIGKILLs itself while saving the checkpoint of step S, after DeepSpeed wrote
                                    its files and before the checkpoint is complete
    BIGTRAIN_TEST_KILL_STEP=S       it SIGKILLs itself inside step S (in the middle of its forward passes)
    BIGTRAIN_TEST_SLOW_VERIFY=T     checking the prepared shards against their SHA-256 takes T seconds longer (on
                                    the rank that checks them, global rank 0)
    BIGTRAIN_TEST_SEED_HOST_RNG=1   Python's and NumPy's generators start from seed 0 on every rank (nothing in a
                                    step draws from them, but each checkpoint records their state: two runs then
                                    write byte-identical trainer records)
"""

import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigtrain.checkpoint import save  # noqa: E402
from bigtrain.cli.train import run_train  # noqa: E402
from bigtrain.data import corpus  # noqa: E402
from bigtrain.data.loader import TrainingData  # noqa: E402
from bigtrain.models import loss  # noqa: E402

RANK = int(os.environ.get("BIGTRAIN_TEST_RANK", "0"))
NAN_STEPS = {int(s) for s in os.environ.get("BIGTRAIN_TEST_NAN_STEPS", "").split(",") if s}
SLEEP_STEP = int(os.environ.get("BIGTRAIN_TEST_SLEEP_STEP", "0"))
KILL_SAVE = int(os.environ.get("BIGTRAIN_TEST_KILL_SAVE", "0"))
KILL_STEP = int(os.environ.get("BIGTRAIN_TEST_KILL_STEP", "0"))
SLOW_VERIFY = float(os.environ.get("BIGTRAIN_TEST_SLOW_VERIFY", "0"))
NOW = {"step": 0, "me": False}

_micro_batches = TrainingData.micro_batches


def micro_batches(self, step):
    NOW["step"], NOW["me"] = step + 1, self.rank == RANK
    if NOW["me"] and NOW["step"] == SLEEP_STEP:
        time.sleep(3600)
    return _micro_batches(self, step)


_loss_sum = loss.Criterion.loss_sum


def loss_sum(self, logits, labels):
    value = _loss_sum(self, logits, labels)
    if NOW["me"] and NOW["step"] == KILL_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    if NOW["me"] and NOW["step"] in NAN_STEPS:
        value = value * float("nan")
    return value


_write_trainer_record = save.write_trainer_record


def write_trainer_record(folder, rank, record, *save):
    _write_trainer_record(folder, rank, record, *save)
    if NOW["me"] and NOW["step"] == KILL_SAVE:
        os.kill(os.getpid(), signal.SIGKILL)


_verify_shards = corpus.verify_shards


def verify_shards(*args, **kwargs):
    time.sleep(SLOW_VERIFY)  # a check that outlasts parallel.collective_timeout (a big corpus on a slow disk)
    return _verify_shards(*args, **kwargs)


TrainingData.micro_batches = micro_batches
corpus.verify_shards = verify_shards
loss.Criterion.loss_sum = loss_sum
save.write_trainer_record = write_trainer_record

if os.environ.get("BIGTRAIN_TEST_SEED_HOST_RNG"):
    import numpy

    random.seed(0)
    numpy.random.seed(0)

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
