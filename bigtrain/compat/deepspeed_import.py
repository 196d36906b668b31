"""Importing DeepSpeed without the optional imports it never needs here.

`import deepspeed` imports its autotuner, which imports mlflow whenever mlflow is installed (bigtrain's
`log.mlflow` puts it in the environment): mlflow brings pandas, sqlalchemy and more, which more than doubles the
import time of every DeepSpeed rank and launcher (measured here: 21 s against 8 s on a loaded 2-core machine). The
autotuner is not used by bigtrain, so DeepSpeed is imported with mlflow hidden (`sys.modules["mlflow"] = None`
makes `import mlflow` raise ImportError, which DeepSpeed catches); mlflow itself stays importable afterwards, for
bigtrain's own tracking.

DeepSpeed's ZeRO and bf16 optimizers (and its engine) import its Muon optimizer to ask whether the optimizer is
one (`isinstance(..., MuonWithAuxAdam)`); that module wraps three functions in `torch.compile` as it is imported,
which loads TorchInductor: 1.7 s of CPU in every DeepSpeed rank (measured here), for an optimizer bigtrain never
builds (its optimizers are its own AdamW and LAMB, `bigtrain.optim`). So the Muon modules are imported once here,
right after DeepSpeed, with DeepSpeed's `compiler.compile()` answering its own identity decorator
(`compiler.dummy_decorator`, what it answers where torch has no compile) for the length of that import only: the
classes are DeepSpeed's own, their three functions stay uncompiled (eager), and nothing else changes."""

from __future__ import annotations

import sys
from types import ModuleType

HIDDEN_FROM_DEEPSPEED = ("mlflow",)


def import_deepspeed() -> ModuleType:
    """The `deepspeed` module, imported (once per process) with the modules of HIDDEN_FROM_DEEPSPEED hidden."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hidden = [name for name in HIDDEN_FROM_DEEPSPEED if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import deepspeed
    finally:
        for name in hidden:
            if sys.modules.get(name, ModuleType(name)) is None:
                del sys.modules[name]
    _import_muon_uncompiled()
    return deepspeed


MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


def _import_muon_uncompiled() -> None:
    """Import MUON_MODULES with `deepspeed.runtime.compiler.compile()` giving the identity decorator (above)."""
    import importlib

    from deepspeed.runtime import compiler

    compile_decorator = compiler.compile
    compiler.compile = lambda: compiler.dummy_decorator
    try:
        for name in MUON_MODULES:
            importlib.import_module(name)
    finally:
        compiler.compile = compile_decorator
