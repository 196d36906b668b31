"""Checkpoints of earlier bigtrains, whose attention kept Q, K and V as three parameters (`q_proj`, `k_proj`,
`v_proj`), read as today's model holds them: one `qkv_proj` per layer (`bigtrain.models.qkv`).

`JoinedQKVReader` serves a layout-free form (or any reader of unsplit tensors) under today's names: a `qkv_proj`
tensor, its Adam moments included, is its three parts joined in the projection's row layout (the moments are per
element, so joining them is exact), then cut to the box a rank asks for. `joined_state` does the same for a whole
state dict. A checkpoint written since has `QKV_LAYOUT` in its trainer state (`written_with_separate_qkv`).
"""

from __future__ import annotations

from typing import Any

import torch

from bigtrain.checkpoint.layout_free import Box, whole
from bigtrain.config import ModelConfig
from bigtrain.models.qkv import QKV_PARTS, join_qkv, join_state, qkv_layout, separate_prefixes

QKV_LAYOUT = "one qkv_proj, rows blocked by key/value head"  # recorded in the trainer state of every save


def written_with_separate_qkv(trainer_state: dict[str, Any]) -> bool:
    """Whether a checkpoint's trainer state says it predates the one Q/K/V parameter."""
    return trainer_state.get("qkv_layout") != QKV_LAYOUT


def joined_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A whole state dict under today's names (unchanged when it already has them)."""
    return join_state(state, *qkv_layout(cfg)) if separate_prefixes(state) else state


class JoinedQKVReader:
    """A reader of unsplit tensors (`LayoutFreeReader`, `TensorReader`) whose Q, K, V are three tensors, serving
    one `qkv_proj` tensor per layer instead (same interface: header, shape, has, read, read_flat, close)."""

    def __init__(self, inner: Any, cfg: ModelConfig) -> None:
        self.inner, self.folder = inner, inner.folder
        self.head_dim, self.groups = qkv_layout(cfg)
        params = dict(inner.header["parameters"])
        self.parts: dict[str, list[str]] = {}
        for prefix in separate_prefixes(params):
            for kind in ("weight", "bias"):
                names = [f"{prefix}{part}.{kind}" for part in QKV_PARTS]
                if all(n in params for n in names):
                    shapes = [params.pop(n)["shape"] for n in names]
                    self.parts[f"{prefix}qkv_proj.{kind}"] = names
                    params[f"{prefix}qkv_proj.{kind}"] = {"shape": [sum(s[0] for s in shapes), *shapes[0][1:]]}
        self.header = {**inner.header, "parameters": params}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header["parameters"][name]["shape"])

    def has(self, name: str, kind: str) -> bool:
        return all(self.inner.has(n, kind) for n in self.parts.get(name, [name]))

    def read(self, name: str, kind: str, box: Box | None = None) -> torch.Tensor:
        if name not in self.parts:
            return self.inner.read(name, kind, box)
        full = join_qkv(*(self.inner.read(n, kind) for n in self.parts[name]), self.head_dim, self.groups)
        box = box or whole(full.shape)
        return full[tuple(slice(a, b) for a, b in box)].contiguous()

    def read_flat(self, name: str, kind: str, box: Box, start: int, stop: int) -> torch.Tensor:
        if name not in self.parts:
            return self.inner.read_flat(name, kind, box, start, stop)
        return self.read(name, kind, box).reshape(-1)[start:stop]

    def close(self) -> None:
        self.inner.close()
