"""`launch/train.py` that also logs, on rank 0, the global sample indices of every step it trains to
run.dir/samples.jsonl (one line per step: {"step": k, "indices": [...]}), to show where the data position is."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigtrain.cli import run_train  # noqa: E402
from bigtrain.train import trainer  # noqa: E402

_micro_batches = trainer.Trainer.micro_batches


def micro_batches(self, step):
    if self.env.rank == 0:
        with open(self.run_dir / "samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step + 1, "indices": [int(i) for i in self.sampler.indices(step)]}) + "\n")
    return _micro_batches(self, step)


trainer.Trainer.micro_batches = micro_batches

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
