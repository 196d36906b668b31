"""Data: tokenizers, cached tokenized corpora, per-family datasets, layout-independent batch order.

The names below are imported on first use (PEP 562), so that `bigtrain.data.corpus` and what the worker
processes of `bigtrain prepare` import (`bigtrain.data.shard_workers` and below) load without torch (the datasets
and the batch order need it; tokenizing does not; tests/test_prepare.py checks it). `collate` is imported from its
own module, `bigtrain.data.collate`: a package attribute named like a submodule becomes that submodule as soon as
anything imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ByteTokenizer": "bigtrain.data.tokenizer",
    "GlobalBatchSampler": "bigtrain.data.sampler",
    "HFTokenizer": "bigtrain.data.tokenizer",
    "Tokenizer": "bigtrain.data.tokenizer",
    "build_datasets": "bigtrain.data.build",
    "build_tokenizer": "bigtrain.data.tokenizer",
}

__all__ = [
    "ByteTokenizer",
    "GlobalBatchSampler",
    "HFTokenizer",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
]

if TYPE_CHECKING:
    from bigtrain.data.build import build_datasets
    from bigtrain.data.sampler import GlobalBatchSampler
    from bigtrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bigtrain.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
