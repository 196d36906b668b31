"""`model.init_from`: the weights a run starts from instead of its initialization (fine-tuning), under any layout.

The source is a local Hugging Face folder (GPT-2, Llama, Mixtral, GPT-NeoX, BERT, T5; its config.json must describe
the same model as the run's `model` section) or a bigtrain checkpoint, run.dir or exported folder (weights only).
Either way it is served as a reader of boxes of the unsplit tensors, which the engine's layout-free restore uses with
step 0: each rank reads its tensor shard (its ZeRO partition), no optimizer state is read (the optimizer starts
fresh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bigtrain.checkpoint.layout_free import LayoutFreeReader
from bigtrain.checkpoint.weights import TensorReader, weights_reader
from bigtrain.config.schema import ModelConfig
from bigtrain.errors import CheckpointError, ConfigError
from bigtrain.interop.hf_config import hf_kind, implied_model, mismatches
from bigtrain.interop.hf_files import HFTensors, is_hf_folder, read_hf_config
from bigtrain.interop.hf_weights import ALIASES, Rule, from_hf, rules_for
from bigtrain.models.qkv import QKV_PARTS, join_qkv, qkv_layout, separate_prefixes


def _yaml_value(value: Any) -> str:
    """How an override writes `value`: null, true/false, or the value itself."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _hf_reader(path: Path, cfg: ModelConfig, vocab_size: int) -> TensorReader:
    hf = read_hf_config(path)
    where = str(path / "config.json")
    implied = implied_model(hf, where)
    wrong = mismatches(cfg, implied, vocab_size)
    if wrong:
        raise ConfigError(
            f"model.init_from={path}: its config.json describes another model: "
            + "; ".join(f"model.{k}={ours!r} here, {theirs!r} there" for k, ours, theirs in wrong)
            + ". Set " + " ".join(f"model.{k}={_yaml_value(theirs)}" for k, _, theirs in wrong) + " to fine-tune it.")
    kind = hf_kind(cfg)
    tensors = HFTensors(path)
    rules = rules_for(kind, cfg)
    if cfg.tie_embeddings:
        rules["head.weight"] = rules["embed.tokens.weight"]

    def source_name(rule: Rule) -> str:
        for name in (rule.theirs, *ALIASES.get(rule.theirs, ())):
            if tensors.has(name):
                return name
        raise CheckpointError(f"{path} has no tensor {rule.theirs} (for bigtrain's {rule.ours}): it is not a "
                              f"complete {hf.get('model_type')} checkpoint.")

    # The rules name Q, K, V apart (as transformers does); the model holds them as one `qkv_proj` per layer.
    head_dim, groups = qkv_layout(cfg)
    joined = {f"{prefix}qkv_proj.{kind}": [f"{prefix}{part}.{kind}" for part in QKV_PARTS]
              for prefix in separate_prefixes(rules) for kind in ("weight", "bias")
              if f"{prefix}q_proj.{kind}" in rules}
    parts = {name for names in joined.values() for name in names}

    def tensor(name: str) -> torch.Tensor:
        if name in joined:
            return join_qkv(*(tensor(part) for part in joined[name]), head_dim, groups)
        rule = rules[name]
        return from_hf(rule, lambda _: tensors.read(source_name(rule)))

    for rule in rules.values():
        source_name(rule)  # every tensor is there, before any is loaded
    shapes = {name: tuple(tensor(name).shape) for name in [*(n for n in rules if n not in parts), *joined]}
    return TensorReader(path, shapes, tensor)


def init_source(cfg: ModelConfig, vocab_size: int) -> LayoutFreeReader | TensorReader:
    """A reader of the unsplit weights that `model.init_from` names, checked against this run's model (whose
    embedding has `vocab_size` rows)."""
    assert cfg.init_from is not None
    path = Path(cfg.init_from).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.init_from={cfg.init_from}: no such folder. Give a local Hugging Face checkpoint "
                          f"folder (config.json + weights) or a bigtrain run.dir / checkpoint / export folder.")
    if is_hf_folder(path):
        return _hf_reader(path, cfg, vocab_size)
    return weights_reader(path, cfg, vocab_size, pick="model.init_from")
