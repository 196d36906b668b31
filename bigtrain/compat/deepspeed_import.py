"""Importing DeepSpeed without the optional imports it never needs here.

`import deepspeed` imports its autotuner, which imports mlflow whenever mlflow is installed (bigtrain's
`log.mlflow` puts it in the environment): mlflow brings pandas, sqlalchemy and more, which more than doubles the
import time of every DeepSpeed rank and launcher (measured here: 21 s against 8 s on a loaded 2-core machine). The
autotuner is not used by bigtrain, so DeepSpeed is imported with mlflow hidden (`sys.modules["mlflow"] = None`
makes `import mlflow` raise ImportError, which DeepSpeed catches); mlflow itself stays importable afterwards, for
bigtrain's own tracking."""

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
    return deepspeed
