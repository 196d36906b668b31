"""Packages depend one way (errors, io → config → compat / distributed → data / models / optim → parallel →
planning → engine → checkpoint → inference / interop → train → cli; tests/helpers/layers.py), modules have no
cycle, no package is called components / common / utils / misc / helpers; `bigtrain train --help` imports neither
DeepSpeed nor fairscale and loading a config neither torch nor DeepSpeed.

The checker's own tests plant each construct it has to see in a temporary tree and print what it reports
(`pytest -s tests/test_layering.py` shows it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.helpers.imports import edges_of
from tests.helpers.layers import (
    LAYERS,
    cycle_edges,
    forbidden_packages,
    module_cycles,
    package_cycles,
    package_edges,
    packages_of,
    upward_imports,
)

ROOT = REPO / "bigtrain"


# The real tree.

def test_no_package_imports_from_a_higher_layer():
    problems = upward_imports(ROOT)
    assert not problems, f"{len(problems)} imports against the layering:\n" + "\n".join(problems)


def test_no_cycle_between_packages():
    cycles, edges = package_cycles(ROOT), package_edges(ROOT)
    report = [f"{' <-> '.join(cycle)}:\n" + "\n".join(f"  {edge}" for (a, b), where in sorted(edges.items())
                                                      if a in cycle and b in cycle for edge in where)
              for cycle in cycles]
    assert not cycles, f"{len(cycles)} package cycles:\n" + "\n".join(report)


def test_no_cycle_between_modules():
    """Eager or lazy, within a package or across packages."""
    cycles = module_cycles(ROOT)
    report = [f"{' <-> '.join(cycle)}:\n" + "\n".join(f"  {edge}" for edge in cycle_edges(ROOT, cycle))
              for cycle in cycles]
    assert not cycles, f"{len(cycles)} module cycles:\n" + "\n".join(report)


def test_every_package_has_a_layer_and_every_layer_a_package():
    packages = packages_of(ROOT)
    assert packages == set(LAYERS), (f"without a layer: {sorted(packages - set(LAYERS))}; "
                                     f"in LAYERS but not in bigtrain/: {sorted(set(LAYERS) - packages)}")


def test_no_package_named_after_no_content():
    assert forbidden_packages(ROOT) == []


def test_train_help_imports_neither_deepspeed_nor_fairscale():
    """`python -m bigtrain.cli train --help` (run as -m runs it, through runpy) in a fresh interpreter exits 0 and
    leaves no deepspeed or fairscale module in sys.modules."""
    code = (
        "import atexit, json, runpy, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(\n"
        "    m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'fairscale')))))\n"
        "sys.argv = ['bigtrain', 'train', '--help']\n"
        "runpy.run_module('bigtrain.cli', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: bigtrain train" in proc.stdout, proc.stdout
    assert json.loads(proc.stdout.splitlines()[-1]) == []


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


# The checker, on planted trees.

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "bigtrain"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "__init__.py").touch()
    for package in ("config", "data", "models", "optim", "engine", "train", "cli"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def _show(construct: str, reported: list) -> None:
    print(f"\n[{construct}] the checker reports:\n" + "\n".join(f"  {item}" for item in reported))


def test_catches_from_bigtrain_import_package(tmp_path):
    """(a) `from bigtrain import engine` in a lower layer (models) is an upward edge to bigtrain.engine, not an
    import of the package root."""
    root = _tree(tmp_path, {"models/attention.py": "import torch\nfrom bigtrain import engine, __version__\n"})
    problems = upward_imports(root)
    _show("a: from bigtrain import engine", problems)
    assert problems == ["bigtrain.models.attention:2 imports bigtrain.engine [eager] (layer models=3 < engine=6)"]


def test_catches_a_relative_package_import(tmp_path):
    """(b) `from .. import models` in config/ is an upward edge to bigtrain.models; `from ..models import build`
    (a module) one to bigtrain.models.build, `from ..models import Model` (a name) one to bigtrain.models."""
    root = _tree(tmp_path, {
        "models/build.py": "",
        "config/checks.py": (
            "from .. import models\n\n"
            "def f():\n"
            "    from ..models import Model, build\n")})
    problems = upward_imports(root)
    _show("b: from .. import models", problems)
    assert problems == [
        "bigtrain.config.checks:1 imports bigtrain.models [eager] (layer config=1 < models=3)",
        "bigtrain.config.checks:4 imports bigtrain.models [lazy] (layer config=1 < models=3)",
        "bigtrain.config.checks:4 imports bigtrain.models.build [lazy] (layer config=1 < models=3)"]


def test_catches_import_module_with_a_constant_string(tmp_path):
    """(c) `importlib.import_module("bigtrain.engine.local")` in models/ is an upward edge, lazy or not."""
    root = _tree(tmp_path, {"models/build.py": (
        "import importlib\n"
        "from importlib import import_module\n\n"
        "ENGINE = importlib.import_module('bigtrain.engine.local')\n\n"
        "def f():\n"
        "    return import_module('.local', 'bigtrain.engine')\n")})
    problems = upward_imports(root)
    _show("c: importlib.import_module('bigtrain.engine.local')", problems)
    assert problems == [
        "bigtrain.models.build:4 imports bigtrain.engine.local [import_module, eager] (layer models=3 < engine=6)",
        "bigtrain.models.build:7 imports bigtrain.engine.local [import_module, lazy] (layer models=3 < engine=6)"]


def test_catches_a_subprocess_launch_of_a_bigtrain_module(tmp_path):
    """(d) `subprocess.run([sys.executable, "-m", "bigtrain.cli.x"])` in train/ is an upward edge to the launched
    module; `-m bigtrain.cli` (a package with a __main__.py) is one to bigtrain.cli.__main__."""
    root = _tree(tmp_path, {
        "cli/x.py": "",
        "cli/__main__.py": "",
        "train/convert.py": (
            "import subprocess\nimport sys\n\n"
            "def convert(path):\n"
            "    subprocess.run([sys.executable, '-m', 'bigtrain.cli.x', str(path)], check=True)\n"
            "    subprocess.run(('torchrun', '-m', 'bigtrain.cli', 'train'), check=True)\n")})
    problems = upward_imports(root)
    _show("d: subprocess.run([sys.executable, '-m', 'bigtrain.cli.x'])", problems)
    assert problems == [
        "bigtrain.train.convert:5 imports bigtrain.cli.x [-m, lazy] (layer train=9 < cli=10)",
        "bigtrain.train.convert:6 imports bigtrain.cli.__main__ [-m, lazy] (layer train=9 < cli=10)"]


def test_catches_a_lazy_module_cycle_inside_one_package(tmp_path):
    """(e) engine/a.py imports engine/b.py at module level, b.py imports a inside a function: a module cycle,
    though no package edge and no upward one exists."""
    root = _tree(tmp_path, {
        "engine/a.py": "from bigtrain.engine import b\n",
        "engine/b.py": "def f():\n    from . import a\n    return a\n"})
    assert upward_imports(root) == [] and package_cycles(root) == []
    cycles = module_cycles(root)
    _show("e: engine/a.py <-> engine/b.py (lazy)", cycles + cycle_edges(root, cycles[0]))
    assert cycles == [["bigtrain.engine.a", "bigtrain.engine.b"]]
    assert [str(e) for e in cycle_edges(root, cycles[0])] == [
        "bigtrain.engine.a:1 imports bigtrain.engine.b [eager]",
        "bigtrain.engine.b:2 imports bigtrain.engine.a [lazy]"]


def test_catches_a_name_imported_through_the_package_init(tmp_path):
    """A module that takes a name from its own package's __init__, which imports it: the cycle {bigtrain.data,
    bigtrain.data.a}. Taking a sibling *module* through the package (`from bigtrain.data import c`) is none."""
    root = _tree(tmp_path, {
        "data/__init__.py": "from bigtrain.data.a import A\nB = 1\n",
        "data/a.py": "from bigtrain.data import B, c\nA = B\n",
        "data/c.py": ""})
    cycles = module_cycles(root)
    _show("a name through the package __init__", cycles + cycle_edges(root, cycles[0]))
    assert cycles == [["bigtrain.data", "bigtrain.data.a"]]
    assert {e.target for e in edges_of(root) if e.source == "bigtrain.data.a"} == {"bigtrain.data",
                                                                                  "bigtrain.data.c"}


def test_catches_a_lazy_export_table_and_type_checking_imports(tmp_path):
    """A PEP 562 table of module names (as bigtrain/data/__init__.py's _EXPORTS) and imports under TYPE_CHECKING
    are edges; a string that names no module of the tree is not."""
    root = _tree(tmp_path, {
        "engine/local.py": "",
        "optim/__init__.py": (
            "from typing import TYPE_CHECKING\n\n"
            "if TYPE_CHECKING:\n"
            "    from bigtrain.engine.local import LocalEngine\n\n"
            "_EXPORTS = {\n"
            "    'LocalEngine': 'bigtrain.engine.local',\n"
            "    'count_replace': 'bigtrain.count_replace',\n"
            "}\n")})
    problems = upward_imports(root)
    _show("lazy-export table, TYPE_CHECKING", problems)
    assert problems == [
        "bigtrain.optim:4 imports bigtrain.engine.local [TYPE_CHECKING] (layer optim=3 < engine=6)",
        "bigtrain.optim:7 imports bigtrain.engine.local [export table, eager] (layer optim=3 < engine=6)"]


def test_catches_a_cycle_between_siblings(tmp_path):
    root = _tree(tmp_path, {"data/a.py": "from bigtrain.optim import x\n", "optim/b.py": "import bigtrain.data.a\n"})
    assert upward_imports(root) == []  # same layer
    assert package_cycles(root) == [["data", "optim"]]
    assert module_cycles(root) == []  # bigtrain.optim (x) does not import bigtrain.optim.b


def test_refuses_a_package_named_components(tmp_path):
    """A package (or module) named components, common, utils, misc or helpers is refused."""
    root = _tree(tmp_path, {"components/__init__.py": "", "models/utils.py": "", "misc/x.py": ""})
    refused = forbidden_packages(root)
    _show("forbidden names", refused)
    assert [Path(p).as_posix() for p in refused] == ["bigtrain/components", "bigtrain/misc", "bigtrain/models/utils.py"]
