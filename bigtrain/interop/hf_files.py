"""Reading a local Hugging Face checkpoint folder tensor by tensor: `config.json` plus `model.safetensors`, a
sharded `model.safetensors.index.json`, or `pytorch_model.bin` (read with the weights-only unpickler)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bigtrain.errors import CheckpointError
from bigtrain.io import confined, load_failure


def is_hf_folder(path: Path) -> bool:
    """A folder with a transformers config.json (a `model_type` in it)."""
    try:
        return path.is_dir() and "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def read_hf_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'config.json'} cannot be read ({type(exc).__name__}): model.init_from "
                              f"needs a Hugging Face checkpoint folder with config.json.") from None


class HFTensors:
    """The tensors of a transformers checkpoint folder, opened lazily: `read(name)` loads one tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        index = folder / "model.safetensors.index.json"
        if (folder / "model.safetensors").exists():
            self._add_file(folder / "model.safetensors")
        elif index.exists():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} cannot be read ({type(exc).__name__}).") from None
            # Each file it names must be in the folder (by its name: a hub cache's files are links into its store).
            fix = "Download the checkpoint again from where it came from."
            self._where = {name: confined(folder, file, index, fix, follow_links=False)
                           for name, file in weight_map.items()}
        elif (folder / "pytorch_model.bin").exists():
            try:
                self._pickled = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True,
                                           mmap=True)
            except Exception as exc:
                raise CheckpointError(f"{folder / 'pytorch_model.bin'} cannot be read ({load_failure(exc)}).") from None
            self._where = {name: folder / "pytorch_model.bin" for name in self._pickled}
        else:
            raise CheckpointError(f"{folder} has a config.json but no weights: expected model.safetensors, "
                                  f"model.safetensors.index.json or pytorch_model.bin.")

    def _add_file(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:
            raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}).") from None
        self._open[path] = handle
        self._where.update({name: path for name in handle.keys()})

    def names(self) -> set[str]:
        return set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[name].float()
        path = self._where[name]
        if path not in self._open:
            self._add_file(path)
        return self._open[path].get_tensor(name).float()

    def close(self) -> None:
        self._open.clear()
        self._pickled = None
