"""`bigtrain prepare` and its worker processes never load torch (bigtrain/data/__init__.py): the modules of the
entry points, the build, and what the spawned workers import load in a fresh interpreter without it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

WORKER_MODULES = [
    "bigtrain.data.corpus", "bigtrain.data.corpus_build", "bigtrain.data.shard_workers", "bigtrain.data.shard_build",
    "bigtrain.data.build_progress", "bigtrain.data.build_lock", "bigtrain.data.cache_writes", "bigtrain.data.sources",
    "bigtrain.data.source_units", "bigtrain.data.source_datasets", "bigtrain.data.source_plan",
    "bigtrain.data.source_reading",
]


def test_what_the_prepare_workers_import_loads_without_torch() -> None:
    """In a fresh interpreter: the modules of `bigtrain prepare` — the entry points, the build, and what its spawned
    worker processes import (bigtrain.data.shard_workers and below) — load without torch."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {WORKER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []
