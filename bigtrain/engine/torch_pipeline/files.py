"""The torch_pipeline engine's own checkpoint files: one per rank, `torch_pipeline_rankNNNNN.pt`, holding the
parameters of its stages under the unsplit model's names (tensor-parallel shards as they are) and its optimizer's
state dict. A full model is the union over the pipeline ranks of one data-parallel replica, per tensor rank."""

from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.config.layout import Layout
from bigtrain.io import load_torch


def native_part(rank: int) -> str:
    return f"torch_pipeline_rank{rank:05d}.pt"


def tensor_rank_state(checkpoint: Path, layout: Layout, tensor_rank: int,
                      tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The parameters of tensor rank `tensor_rank` (its shards) from data-parallel replica 0, every stage's (a tied
    head under its own name too, as a state dict holds it)."""
    state: dict[str, torch.Tensor] = {}
    for pipe in range(layout.pipeline):
        rank = layout.rank_of(pipe, 0, tensor_rank)
        for name, value in load_torch(checkpoint / native_part(rank))["model"].items():
            state.setdefault(name, value)  # a tied embedding: equal copies on several ranks
    if tie_embeddings:
        state.setdefault("head.weight", state["embed.tokens.weight"])
    return state
