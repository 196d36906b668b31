"""The fairscale engine's own checkpoint files, and reading them without the engine (consolidation).

    fairscale_rankNNNNN.pt   every rank: its optimizer shard (`optimizer`); OSS: data rank 0 of each tensor rank
                             also the whole model shard of that tensor rank (`model`); FSDP: every rank its flat
                             shard of every parameter (`model`) and the shapes they were cut from (`shapes`)
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.config.layout import Layout
from bigtrain.engine.fairscale.fully_sharded import unshard
from bigtrain.io import load_torch


def native_part(rank: int) -> str:
    return f"fairscale_rank{rank:05d}.pt"


def tensor_rank_state(checkpoint: Path, layout: Layout, tensor_rank: int) -> dict[str, torch.Tensor]:
    """One tensor rank's whole state from the engine's files: data rank 0's model (OSS), or every data rank's
    flat shards put back together (FSDP)."""
    fsdp = layout.zero_stage == 3
    parts = [load_torch(checkpoint / native_part(layout.rank_of(0, d, tensor_rank)))
             for d in range(layout.data if fsdp else 1)]
    if not fsdp:
        return parts[0]["model"]
    shapes = parts[0]["shapes"]
    return {name: unshard([p["model"][name] for p in parts], shape) for name, shape in shapes.items()}
