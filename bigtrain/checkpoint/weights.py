"""One set of weights from whatever a user points at, for the one-device commands (`evaluate`, `export`,
`consolidate`, `generate`, `attention`) and `model.init_from`:

    a run.dir                     its latest checkpoint (below), or the one of `step` (`--step N`)
    a checkpoint (step_N/)        its layout-free form when it has one (verified, read tensor by tensor), else
                                  its engine's own files gathered into one state dict (`consolidate.py`)
    a `bigtrain export` folder    model.safetensors + config.yaml
    a `bigtrain consolidate` one  model.pt + config.yaml (read with the weights-only unpickler)

The config that comes with the weights is the run's, with a one-device layout; the weights have today's names
(an earlier bigtrain's three Q, K, V tensors per layer joined into `qkv_proj`, `joined_qkv.py`). `weights_reader`
serves the same weights as boxes of unsplit tensors (what a layout-free restore reads), so a rank reads only its
shard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from bigtrain.checkpoint.consolidate import consolidated_state_dict
from bigtrain.checkpoint.joined_qkv import JoinedQKVReader, joined_state
from bigtrain.checkpoint.layout_free import FOLDER, Box, LayoutFreeReader, box_shape, whole
from bigtrain.checkpoint.saved import SavedCheckpoint, find_checkpoint
from bigtrain.checkpoint.store import writing
from bigtrain.config import ModelConfig, config_to_dict, dump_config
from bigtrain.config.loader import config_from_dict, read_yaml
from bigtrain.errors import CheckpointError, ConfigError, UsageError
from bigtrain.io import load_failure, save_safetensors
from bigtrain.models.qkv import separate_prefixes

ONE_DEVICE = {"tensor": 1, "pipeline": 1, "data": None, "context": 1, "sequence_parallel": False,
              "pipeline_schedule": "1f1b", "virtual_stages": 1}
# Model keys that do not change what the weights mean (training choices): left out when a source's model
# section is compared with a run's.
TRAINING_KEYS = {"dropout", "attention_dropout", "init", "init_std", "init_from", "vocab_multiple", "vocab_size"}


def one_device(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the layout of one device (the weights are whole). parallel.engine=torch is the plain
    engine there, which shards nothing: its zero_stage (FSDP2's on several ranks) becomes 0."""
    raw = dict(raw)
    raw["parallel"] = {**raw.get("parallel", {}), **ONE_DEVICE}
    if raw["parallel"].get("engine") == "torch":
        raw["parallel"]["zero_stage"] = 0
    return raw


def _weights_folder(path: Path, step: int | None = None) -> bool:
    """A folder written by `bigtrain export` or `bigtrain consolidate` (weights and a config, no optimizer); such
    a folder holds one set of weights, so a `step` to choose is a UsageError."""
    found = (path / "model.safetensors").exists() or ((path / "model.pt").exists() and
                                                      not (path / "optimizer.pt").exists())
    if found and step is not None:
        raise UsageError(f"--step {step}: {path} holds one set of weights (written by `bigtrain export` or "
                         f"`bigtrain consolidate`), not a run's checkpoints; leave --step out, or pass the run.dir "
                         f"of the run with --step.")
    return found


def weights_config(path: Path, step: int | None = None) -> dict[str, Any]:
    """The one-device config dict that comes with the weights at `path` (a run.dir: its checkpoint of `step`,
    default the latest), without reading the weights."""
    if _weights_folder(path, step):
        return _folder_config(path)
    return one_device(config_to_dict(SavedCheckpoint.read(_checkpoint_of(path, step)).config))


def load_weights(path: Path, step: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(one-device config dict, full fp32 state dict) of `path` (see the module docstring); in a run.dir, the
    checkpoint of `step` (default: the latest)."""
    if _weights_folder(path, step) and (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        raw = _folder_config(path)
        return raw, _joined(raw, _read(path / "model.safetensors", lambda p: load_file(str(p))))
    if _weights_folder(path, step):
        raw = _folder_config(path)
        return raw, _joined(raw, _read(path / "model.pt", lambda p: torch.load(p, map_location="cpu",
                                                                                weights_only=True)))
    return checkpoint_weights(_checkpoint_of(path, step))


def _joined(raw: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state under today's names: an earlier bigtrain's three Q, K, V tensors joined (`joined_qkv.py`)."""
    return joined_state(state, config_from_dict(raw).model)


def _checkpoint_of(path: Path, step: int | None = None, pick: str = "--step") -> Path:
    if not (path / "checkpoints").is_dir() and not (path / "config.yaml").exists():
        raise CheckpointError(f"{path} holds no weights bigtrain knows: pass a run.dir, a checkpoint folder "
                              f"(step_N), or a folder written by `bigtrain export` or `bigtrain consolidate`.")
    return find_checkpoint(path, step, pick)


def checkpoint_weights(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The weights of one (verified) checkpoint folder: from its layout-free form if it has one, else its own
    files."""
    saved = SavedCheckpoint.read(checkpoint)
    raw = one_device(config_to_dict(saved.config))
    if saved.has_layout_free:
        reader = _verified_reader(checkpoint, "The layout-free form of")
        return raw, _joined(raw, {name: reader.read(name, "param") for name in reader.header["parameters"]})
    return raw, _joined(raw, consolidated_state_dict(saved))


def _verified_reader(checkpoint: Path, what: str) -> LayoutFreeReader:
    reader = LayoutFreeReader(checkpoint / FOLDER)
    problem = reader.verify_all()
    if problem:
        raise CheckpointError(f"{what} {checkpoint} is damaged: {problem}.")
    return reader


def _folder_config(path: Path) -> dict[str, Any]:
    if not (path / "config.yaml").exists():
        raise CheckpointError(f"{path} has weights but no config.yaml beside them; write the folder again with "
                              f"`bigtrain export` or `bigtrain consolidate`.")
    return one_device(read_yaml(path / "config.yaml"))


def _read(path: Path, loader) -> dict[str, torch.Tensor]:
    try:
        return dict(loader(path))
    except Exception as exc:  # a damaged file, or objects the weights-only unpickler refuses
        raise CheckpointError(f"Cannot read {path} ({load_failure(exc)}). Write it again with `bigtrain export` "
                              f"(or `bigtrain consolidate`).") from None


def with_tied(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The output head shares the embedding when the model ties them: files store it once."""
    if tie_embeddings and "head.weight" not in state and "embed.tokens.weight" in state:
        state = {**state, "head.weight": state["embed.tokens.weight"]}
    return state


def consolidate(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write `<out>/model.pt` and `<out>/config.yaml`; default out: run_dir/consolidated/step_N. The weights come
    from the checkpoint's layout-free form when it has one (the same weights, already whole), else from its
    engine's own files; the config is the run's with a one-device layout (tensor = pipeline = 1)."""
    checkpoint = find_checkpoint(run_dir, step)
    raw, state = checkpoint_weights(checkpoint)
    out = out or run_dir / "consolidated" / checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    with writing(out / "model.pt"):
        torch.save(state, out / "model.pt")
    (out / "config.yaml").write_text(dump_config(config_from_dict(raw)))
    return out


def export_safetensors(path: Path, out: Path, step: int | None = None) -> Path:
    """Write `out/model.safetensors` (the weights alone, for inference) and `out/config.yaml` (one device); a
    run.dir: its checkpoint of `step` (default: the latest)."""
    raw, state = load_weights(path, step)
    if raw.get("model", {}).get("tie_embeddings", True):
        state.pop("head.weight", None)  # shared with embed.tokens.weight; safetensors stores a tensor once
    out.mkdir(parents=True, exist_ok=True)
    with writing(out / "model.safetensors"):
        save_safetensors(out / "model.safetensors", {k: v.detach().float().contiguous() for k, v in state.items()},
                         metadata={"format": "bigtrain", "source": str(path)})
        (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


# ---- boxes of unsplit tensors ------------------------------------------------------------------------------
class TensorReader:
    """Boxes of unsplit bigtrain tensors, computed by `tensor(name)` (the interface of `LayoutFreeReader` that
    a layout-free restore uses: header, shape, has, read, read_flat)."""

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]], tensor: Callable[[str], torch.Tensor]
                 ) -> None:
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


def weights_reader(path: Path, cfg: ModelConfig, vocab_size: int, step: int | None = None,
                   pick: str = "--step") -> LayoutFreeReader | TensorReader:
    """The unsplit weights of a bigtrain run.dir (its checkpoint of `step`, default the latest), checkpoint (its
    layout-free form: box reads) or export folder, checked to be `cfg`'s model (whose embedding has `vocab_size`
    rows); `pick`: how the user chooses another checkpoint (`find_checkpoint`)."""
    if not _weights_folder(path, step):
        checkpoint = _checkpoint_of(path, step, pick)
        saved = SavedCheckpoint.read(checkpoint)
        if saved.has_layout_free:
            _check_same_model(path, cfg, config_from_dict(config_to_dict(saved.config)).model)
            reader = _verified_reader(checkpoint, f"model.init_from={path}: the layout-free form of")
            _check_rows(path, reader.shape("embed.tokens.weight")[0], vocab_size)
            if cfg.tie_embeddings and "head.weight" not in reader.header["parameters"]:
                reader.header["parameters"]["head.weight"] = reader.header["parameters"]["embed.tokens.weight"]
                reader.pieces[("head.weight", "param")] = reader.pieces[("embed.tokens.weight", "param")]
            return JoinedQKVReader(reader, cfg) if separate_prefixes(reader.header["parameters"]) else reader
    raw, state = load_weights(path, step)
    _check_same_model(path, cfg, config_from_dict(raw).model)
    _check_rows(path, state["embed.tokens.weight"].shape[0], vocab_size)
    state = with_tied(state, cfg.tie_embeddings)
    return TensorReader(path, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__)


def _check_rows(path: Path, rows: int, vocab_size: int) -> None:
    if rows != vocab_size:
        raise ConfigError(f"model.init_from={path} has an embedding of {rows} rows; this run's has {vocab_size} "
                          f"(model.vocab_size, or the tokenizer's size rounded up to model.vocab_multiple). Set "
                          f"model.vocab_size={rows} and use the same tokenizer.")


def _check_same_model(path: Path, cfg: ModelConfig, theirs: ModelConfig) -> None:
    wrong = [(k, getattr(cfg, k), getattr(theirs, k)) for k in vars(cfg) if k not in TRAINING_KEYS
             and getattr(cfg, k) != getattr(theirs, k)]
    if wrong:
        raise ConfigError(f"model.init_from={path} holds another model: "
                          + "; ".join(f"model.{k}={a!r} here, {b!r} there" for k, a, b in wrong)
                          + ". Use the same model section (only dropout and init may differ).")
