"""`model.init_from`: the weights a run starts from instead of its initialization (fine-tuning), under any layout.

The source is a local Hugging Face folder (GPT-2, Llama, BERT, T5; its config.json must describe the same model
as the run's `model` section) or a bigtrain checkpoint, run.dir or exported folder (weights only). Either way it
is served as a reader of boxes of the unsplit tensors, which the engine's layout-free restore uses with step 0:
each rank reads its tensor shard (its ZeRO partition), no optimizer state is read (the optimizer starts fresh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bigtrain.checkpoint.layout_free import FOLDER, INDEX, Box, LayoutFreeReader, box_shape, whole
from bigtrain.config.schema import ModelConfig
from bigtrain.errors import CheckpointError, ConfigError
from bigtrain.interop.hf_config import hf_kind, implied_model, mismatches
from bigtrain.interop.hf_files import HFTensors, is_hf_folder, read_hf_config
from bigtrain.interop.hf_weights import ALIASES, Rule, from_hf, rules_for

# Keys that do not change what the weights mean (training choices), left out of the comparison with a bigtrain
# source's model section.
_TRAINING_KEYS = {"dropout", "attention_dropout", "init", "init_std", "init_from", "vocab_multiple", "vocab_size"}


class TensorReader:
    """Boxes of unsplit bigtrain tensors, computed by `tensor(name)` (the interface of `LayoutFreeReader` that
    the engine's restore uses: parameters, shape, has, read, read_flat)."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], tensor) -> None:
        self.folder, self._shapes, self._tensor = folder, shapes, tensor
        self.header: dict[str, Any] = {"parameters": {name: {"shape": list(s)} for name, s in shapes.items()}}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def has(self, name: str, kind: str) -> bool:
        return kind == "param" and name in self._shapes

    def read(self, name: str, kind: str, box: Box | None = None) -> torch.Tensor:
        full = self._tensor(name)
        box = box or whole(full.shape)
        out = full[tuple(slice(a, b) for a, b in box)]
        assert out.shape == box_shape(box)
        return out.float().contiguous()

    def read_flat(self, name: str, kind: str, box: Box, start: int, stop: int) -> torch.Tensor:
        return self.read(name, kind, box).reshape(-1)[start:stop]

    def close(self) -> None:
        pass


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

    def tensor(name: str) -> torch.Tensor:
        rule = rules[name]
        return from_hf(rule, lambda _: tensors.read(source_name(rule)))

    for rule in rules.values():
        source_name(rule)  # every tensor is there, before any is loaded
    shapes = {name: tuple(tensor(name).shape) for name in rules}
    return TensorReader(path, shapes, tensor)


def bigtrain_reader(path: Path, cfg: ModelConfig, vocab_size: int) -> LayoutFreeReader | TensorReader:
    """The unsplit weights of a bigtrain run.dir, checkpoint (its layout-free form: box reads) or export folder,
    checked to be `cfg`'s model."""
    from bigtrain.checkpoint.weights import load_weights, with_tied
    from bigtrain.config.loader import config_from_dict

    checkpoint = path
    if (path / "checkpoints").is_dir():
        from bigtrain.checkpoint.consolidate import find_checkpoint

        checkpoint = find_checkpoint(path, None)
    if (checkpoint / FOLDER / INDEX).exists():
        from bigtrain.checkpoint import store as ckpt
        from bigtrain.config import config_to_dict

        saved, _ = ckpt.saved_config(checkpoint)
        _check_same_model(path, cfg, config_from_dict(config_to_dict(saved)).model, vocab_size)
        reader = LayoutFreeReader(checkpoint / FOLDER)
        problem = reader.verify_all()
        if problem:
            raise CheckpointError(f"model.init_from={path}: the layout-free form is damaged: {problem}.")
        _check_rows(path, reader.shape("embed.tokens.weight")[0], vocab_size)
        if cfg.tie_embeddings and "head.weight" not in reader.header["parameters"]:
            reader.header["parameters"]["head.weight"] = reader.header["parameters"]["embed.tokens.weight"]
            reader.pieces[("head.weight", "param")] = reader.pieces[("embed.tokens.weight", "param")]
        return reader
    raw, state = load_weights(path)
    _check_same_model(path, cfg, config_from_dict(raw).model, vocab_size)
    _check_rows(path, state["embed.tokens.weight"].shape[0], vocab_size)
    state = with_tied(state, cfg.tie_embeddings)
    return TensorReader(path, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__)


def _check_rows(path: Path, rows: int, vocab_size: int) -> None:
    if rows != vocab_size:
        raise ConfigError(f"model.init_from={path} has an embedding of {rows} rows; this run's has {vocab_size} "
                          f"(model.vocab_size, or the tokenizer's size rounded up to model.vocab_multiple). Set "
                          f"model.vocab_size={rows} and use the same tokenizer.")


def _check_same_model(path: Path, cfg: ModelConfig, theirs: ModelConfig, vocab_size: int) -> None:
    wrong = [(k, getattr(cfg, k), getattr(theirs, k)) for k in vars(cfg) if k not in _TRAINING_KEYS
             and getattr(cfg, k) != getattr(theirs, k)]
    if wrong:
        raise ConfigError(f"model.init_from={path} holds another model: "
                          + "; ".join(f"model.{k}={a!r} here, {b!r} there" for k, a, b in wrong)
                          + ". Use the same model section (only dropout and init may differ).")


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
    return bigtrain_reader(path, cfg, vocab_size)
