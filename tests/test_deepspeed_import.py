"""DeepSpeed is imported without mlflow (bigtrain/compat/deepspeed_import.py): every rank of a DeepSpeed run and
every distributed start-up imports it, and its autotuner's optional `import mlflow` more than doubled that cost."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

ROOT = REPO / "bigtrain"


def test_import_deepspeed_leaves_mlflow_out_and_importable():
    code = ("import sys\nfrom bigtrain.compat.deepspeed_import import import_deepspeed\nimport_deepspeed()\n"
            "import deepspeed.autotuning.autotuner as tuner\n"
            "print('mlflow' in sys.modules, tuner.has_mlflow)\nimport mlflow\nprint(mlflow.__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["False", "False", "mlflow"], proc.stdout  # after DeepSpeed's own prints


def test_every_deepspeed_import_in_bigtrain_goes_through_import_deepspeed():
    """A bare `import deepspeed` only in deepspeed_import.py; every function that imports from deepspeed calls
    import_deepspeed() before (module-level imports of deepspeed are not allowed at all)."""
    problems = []
    for path in ROOT.rglob("*.py"):
        if path.name == "deepspeed_import.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            imports = [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.Import | ast.ImportFrom)
                       and any((a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0] == "deepspeed"
                               for a in (n.names if isinstance(n, ast.Import) else [n]))]
            for imp in imports:
                where = f"{path.relative_to(REPO)}:{imp.lineno}"
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    problems.append(f"{where}: deepspeed imported outside a function")
                    continue
                before = [n for n in ast.walk(node) if isinstance(n, ast.Call) and getattr(n.func, "id", "")
                          == "import_deepspeed" and n.lineno < imp.lineno]
                if not before:
                    problems.append(f"{where}: no import_deepspeed() before it")
    assert not problems, "\n".join(problems)


def test_a_rank_loads_neither_torchinductor_nor_torchao():
    """A DeepSpeed rank's imports (bigtrain's trainer and engines, DeepSpeed with its ZeRO optimizer's Muon check)
    leave TorchInductor (1.7 s of CPU a rank: Muon's torch.compile at import) and torchao (1.2 s: FP8 only) out;
    DeepSpeed's Muon classes are its own and its `compiler.compile` is torch.compile again afterwards."""
    code = ("import sys, torch\nimport bigtrain.cli.train, bigtrain.train.trainer, bigtrain.engine.build\n"
            "from bigtrain.compat.deepspeed_import import import_deepspeed\nimport_deepspeed()\n"
            "import deepspeed.runtime.zero.stage_1_and_2, deepspeed.runtime.zero.stage3\n"
            "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
            "from deepspeed.runtime import compiler\n"
            "print('RESULT', 'torch._inductor' in sys.modules, 'torchao' in sys.modules,\n"
            "      MuonWithAuxAdam.__module__, compiler.compile() is torch.compile)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert line.split()[1:] == ["False", "False", "deepspeed.runtime.zero.muon.muon_optimizer", "True"], line
