"""`launch/train.py` that also logs, on rank 0, the global sample indices of every step it trains to
run.dir/samples.jsonl (one line per step: {"step": k, "indices": [...]}), to show where the data position is."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigtrain.cli.train import run_train  # noqa: E402
from bigtrain.data.loader import TrainingData  # noqa: E402

_micro_batches = TrainingData.micro_batches


def micro_batches(self, step):
    if self.rank == 0:
        with open(Path(self.cfg.run.dir) / "samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step + 1, "indices": [int(i) for i in self.sampler.indices(step)]}) + "\n")
    return _micro_batches(self, step)


TrainingData.micro_batches = micro_batches

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
