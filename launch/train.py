"""Entry point: `python launch/train.py --config configs/X.yaml [section.key=value ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bigtrain.cli.train import run_train  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:], prog="launch/train.py"))
