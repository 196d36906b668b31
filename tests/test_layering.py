"""Packages depend one way (errors → config → compat / components / distributed → data / models / optim →
parallel → engine → train → cli; tests/helpers/layers.py), and loading a config imports neither torch nor
DeepSpeed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.helpers.layers import LAYERS, package_cycles, upward_imports

ROOT = REPO / "bigtrain"


def test_no_package_imports_from_a_higher_layer():
    problems = upward_imports(ROOT)
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_no_cycle_between_packages():
    assert package_cycles(ROOT) == []


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert packages == set(LAYERS), sorted(packages ^ set(LAYERS))


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "bigtrain"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("models", "engine", "config", "data", "optim"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_checker_finds_an_upward_import_even_a_lazy_one(tmp_path):
    """The checker itself: a model file that imports the engine inside a function, and a relative import
    from config up into models, are both reported with file and line."""
    root = _tree(tmp_path, {
        "models/attention.py": "import torch\n\ndef f():\n    from bigtrain.engine.local import LocalEngine\n",
        "config/checks.py": "from ..models import build_model\n",
    })
    problems = upward_imports(root)
    assert any("bigtrain.models.attention:4 imports bigtrain.engine.local" in p for p in problems), problems
    assert any("bigtrain.config.checks:1 imports bigtrain.models" in p for p in problems), problems


def test_checker_finds_a_cycle_between_siblings(tmp_path):
    root = _tree(tmp_path, {"data/a.py": "from bigtrain.optim import x\n", "optim/b.py": "import bigtrain.data.a\n"})
    assert upward_imports(root) == []  # same layer
    assert package_cycles(root) == [["data", "optim", "data"]]


def test_loading_every_shipped_config_imports_neither_torch_nor_deepspeed():
    """In a fresh interpreter: load every configs/*.yaml (and a pipeline layout of one, which once imported
    DeepSpeed to partition stages), then list what got imported."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from bigtrain.config import load_config\n"
        "for path in sorted(Path('configs').glob('*.yaml')):\n"
        "    load_config(path)\n"
        "load_config('configs/smoke.yaml', ['parallel.pipeline=2', 'parallel.tensor=2',\n"
        "            'parallel.sequence_parallel=true', 'parallel.zero_stage=1', 'train.micro_batch_size=8'],\n"
        "            world_size=8)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []
