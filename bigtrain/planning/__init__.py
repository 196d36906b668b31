"""Layout planning: will a config fit on N GPUs, how fast would each layout run, which one to choose.

The names below are imported on first use (PEP 562): `bigtrain.planning.hardware` (the GPUs `bigtrain plan --help`
lists) and `bigtrain.planning.zero` (which the engines use) load without the model code the search needs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ACCELERATORS": "bigtrain.planning.hardware",
    "Accelerator": "bigtrain.planning.hardware",
    "Estimate": "bigtrain.planning.search",
    "ModelShape": "bigtrain.planning.shape",
    "Plan": "bigtrain.planning.search",
    "accelerator": "bigtrain.planning.hardware",
    "make_plan": "bigtrain.planning.search",
    "model_shape": "bigtrain.planning.shape",
}

__all__ = ["ACCELERATORS", "Accelerator", "Estimate", "ModelShape", "Plan", "accelerator", "make_plan",
           "model_shape"]

if TYPE_CHECKING:
    from bigtrain.planning.hardware import ACCELERATORS, Accelerator, accelerator
    from bigtrain.planning.search import Estimate, Plan, make_plan
    from bigtrain.planning.shape import ModelShape, model_shape


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bigtrain.planning' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
