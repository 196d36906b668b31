"""One set of weights from whatever a user points at, for the one-device commands (`evaluate`, `export`,
`consolidate`):

    a run.dir                     its latest checkpoint (below)
    a checkpoint (step_N/)        its layout-free form when it has one (verified, read tensor by tensor), else
                                  its engine's own files gathered into one state dict (`consolidate.py`)
    a `bigtrain export` folder    model.safetensors + config.yaml
    a `bigtrain consolidate` one  model.pt + config.yaml (read with the weights-only unpickler)

The config that comes with the weights is the run's, with a one-device layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.integrity import verify
from bigtrain.checkpoint.layout_free import FOLDER, INDEX, LayoutFreeReader
from bigtrain.config import config_to_dict
from bigtrain.config.loader import read_yaml
from bigtrain.errors import CheckpointError

ONE_DEVICE = {"tensor": 1, "pipeline": 1, "data": None, "sequence_parallel": False}


def one_device(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the layout of one device (the weights are whole)."""
    raw = dict(raw)
    raw["parallel"] = {**raw.get("parallel", {}), **ONE_DEVICE}
    return raw


def load_weights(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(one-device config dict, full fp32 state dict) of `path` (see the module docstring)."""
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        return _folder_config(path), _read(path / "model.safetensors", lambda p: load_file(str(p)))
    if (path / "model.pt").exists() and not (path / "optimizer.pt").exists():
        return _folder_config(path), _read(path / "model.pt", lambda p: torch.load(p, map_location="cpu",
                                                                                    weights_only=True))
    if (path / "checkpoints").is_dir():
        from bigtrain.checkpoint.consolidate import find_checkpoint

        path = find_checkpoint(path, None)
    if not (path / "config.yaml").exists():
        raise CheckpointError(f"{path} holds no weights bigtrain knows: pass a run.dir, a checkpoint folder "
                              f"(step_N), or a folder written by `bigtrain export` or `bigtrain consolidate`.")
    return checkpoint_weights(path)


def weights_config(path: Path) -> dict[str, Any]:
    """The one-device config dict that comes with the weights at `path`, without reading the weights."""
    if (path / "model.safetensors").exists() or ((path / "model.pt").exists() and not (path / "optimizer.pt").exists()):
        return _folder_config(path)
    if (path / "checkpoints").is_dir():
        from bigtrain.checkpoint.consolidate import find_checkpoint

        path = find_checkpoint(path, None)
    if not (path / "config.yaml").exists():
        raise CheckpointError(f"{path} holds no weights bigtrain knows: pass a run.dir, a checkpoint folder "
                              f"(step_N), or a folder written by `bigtrain export` or `bigtrain consolidate`.")
    saved, _ = ckpt.saved_config(path)
    return one_device(config_to_dict(saved))


def checkpoint_weights(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The weights of one checkpoint folder: from its layout-free form if it has one, else its own files."""
    reason = verify(checkpoint)
    if reason is not None:
        raise CheckpointError(f"Checkpoint {checkpoint} is damaged: {reason}. Use another checkpoint of the run.")
    saved, _ = ckpt.saved_config(checkpoint)
    raw = one_device(config_to_dict(saved))
    if (checkpoint / FOLDER / INDEX).exists():
        reader = LayoutFreeReader(checkpoint / FOLDER)
        problem = reader.verify_all()
        if problem:
            raise CheckpointError(f"The layout-free form of {checkpoint} is damaged: {problem}.")
        return raw, {name: reader.read(name, "param") for name in reader.header["parameters"]}
    from bigtrain.checkpoint.consolidate import consolidated_state_dict

    return raw, consolidated_state_dict(checkpoint)


def _folder_config(path: Path) -> dict[str, Any]:
    if not (path / "config.yaml").exists():
        raise CheckpointError(f"{path} has weights but no config.yaml beside them; write the folder again with "
                              f"`bigtrain export` or `bigtrain consolidate`.")
    return one_device(read_yaml(path / "config.yaml"))


def _read(path: Path, loader) -> dict[str, torch.Tensor]:
    try:
        return dict(loader(path))
    except Exception as exc:  # a damaged file, or objects the weights-only unpickler refuses
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"Cannot read {path} ({type(exc).__name__}: {reason}). Write it again with "
                              f"`bigtrain export` (or `bigtrain consolidate`).") from None


def with_tied(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The output head shares the embedding when the model ties them: files store it once."""
    if tie_embeddings and "head.weight" not in state and "embed.tokens.weight" in state:
        state = {**state, "head.weight": state["embed.tokens.weight"]}
    return state


def export_safetensors(path: Path, out: Path) -> Path:
    """Write `out/model.safetensors` (the weights alone, for inference) and `out/config.yaml` (one device)."""
    from safetensors.torch import save_file

    raw, state = load_weights(path)
    if raw.get("model", {}).get("tie_embeddings", True):
        state.pop("head.weight", None)  # shared with embed.tokens.weight; safetensors stores a tensor once
    out.mkdir(parents=True, exist_ok=True)
    with ckpt.writing(out / "model.safetensors"):
        save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "bigtrain", "source": str(path)})
        (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return out
