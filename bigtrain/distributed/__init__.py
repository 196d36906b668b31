"""Process discovery and process groups; nothing here is imported by the model files.

The names below are imported on first use (PEP 562), so that `bigtrain.distributed.rendezvous` (which rank this
is, as the launcher's variables state it: what a command's argument error needs) loads without torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DistEnv": "bigtrain.distributed.rendezvous",
    "detect_env": "bigtrain.distributed.env",
    "init_process_group": "bigtrain.distributed.env",
    "shutdown_process_group": "bigtrain.distributed.env",
}

__all__ = ["DistEnv", "detect_env", "init_process_group", "shutdown_process_group"]

if TYPE_CHECKING:
    from bigtrain.distributed.env import detect_env, init_process_group, shutdown_process_group
    from bigtrain.distributed.rendezvous import DistEnv


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bigtrain.distributed' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
