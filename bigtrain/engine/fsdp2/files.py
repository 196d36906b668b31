"""The FSDP2 engine's own checkpoint files, and reading them without the engine (consolidation).

    fsdp2_rankNNNNN.pt   every rank: its rows of every parameter, flat (`model`), the shape each parameter was
                         cut from (`shapes`, that of its tensor shard) and its optimizer state (`optimizer`)

A parameter is its data ranks' flat values concatenated in rank order: FSDP2 gives rank r the rows
[r·c, r·c + c) of dimension 0, one contiguous range of the flattened parameter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.config.layout import Layout
from bigtrain.io import load_torch


def native_part(rank: int) -> str:
    return f"fsdp2_rank{rank:05d}.pt"


def unshard(values: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """One parameter from the flat values of data ranks 0..D−1."""
    return torch.cat([v.reshape(-1) for v in values]).reshape(shape)


def tensor_rank_state(checkpoint: Path, layout: Layout, tensor_rank: int) -> dict[str, torch.Tensor]:
    """One tensor rank's whole state: every data rank's rows put back together."""
    parts = [load_torch(checkpoint / native_part(layout.rank_of(0, d, tensor_rank))) for d in range(layout.data)]
    shapes = parts[0]["shapes"]
    return {name: unshard([p["model"][name] for p in parts], shape) for name, shape in shapes.items()}
