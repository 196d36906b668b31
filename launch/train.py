"""Entry point: `python launch/train.py --config configs/X.yaml [section.key=value ...]`.

Run with an interpreter that lacks bigtrain's packages (the system Python after `make setup`), it goes on in the
project's own `.venv` when there is one, and otherwise says in one paragraph how to get one.
"""

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
NEEDED = ("torch", "yaml", "deepspeed")


def use_the_project_venv() -> None:
    """Re-run this script with .venv's Python when this one lacks what bigtrain needs (once: never from .venv)."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])
    print(f"bigtrain: error: this Python ({sys.executable}) lacks {', '.join(missing)}, which bigtrain needs, and "
          f"{VENV_PYTHON} does not exist. Run `make setup` in {REPO} (it creates .venv with everything), then "
          f"`.venv/bin/python launch/train.py ...` or `source .venv/bin/activate` (which also puts `bigtrain`, "
          f"`torchrun` and `deepspeed` on the PATH).", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    use_the_project_venv()
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    from bigtrain.cli.train import run_train

    sys.exit(run_train(sys.argv[1:], prog="launch/train.py"))
