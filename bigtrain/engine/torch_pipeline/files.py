"""The torch_pipeline engine's own checkpoint files: one per rank, `torch_pipeline_rankNNNNN.pt`, holding the
parameters of its stages under the unsplit model's names (tensor-parallel shards as they are) and its optimizer's
state dict. A full model is the union over the pipeline ranks of one data-parallel replica, per tensor rank. Under
FSDP2 (parallel.zero_stage 2/3) each file holds its rank's rows of those parameters, flat (`model`), and the shapes
they were cut from (`shapes`): a parameter is its data ranks' rows concatenated in rank order, as FSDP2's own
engine writes them (`bigtrain.engine.fsdp2.files`)."""

from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.config.layout import Layout
from bigtrain.engine.fsdp2.files import unshard
from bigtrain.io import load_torch


def native_part(rank: int) -> str:
    return f"torch_pipeline_rank{rank:05d}.pt"


def _stage_state(checkpoint: Path, layout: Layout, pipe: int, tensor_rank: int) -> dict[str, torch.Tensor]:
    """Pipeline rank `pipe`'s parameters: data replica 0's file, or under FSDP2 (zero_stage 2/3) every data rank's
    rows put back together (`unshard`)."""
    if layout.zero_stage < 2:
        return load_torch(checkpoint / native_part(layout.rank_of(pipe, 0, tensor_rank)))["model"]
    parts = [load_torch(checkpoint / native_part(layout.rank_of(pipe, d, tensor_rank))) for d in range(layout.data)]
    return {name: unshard([p["model"][name] for p in parts], shape) for name, shape in parts[0]["shapes"].items()}


def tensor_rank_state(checkpoint: Path, layout: Layout, tensor_rank: int,
                      tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The parameters of tensor rank `tensor_rank` (its shards) from data-parallel replica 0, every stage's (a tied
    head under its own name too, as a state dict holds it)."""
    state: dict[str, torch.Tensor] = {}
    for pipe in range(layout.pipeline):
        for name, value in _stage_state(checkpoint, layout, pipe, tensor_rank).items():
            state.setdefault(name, value)  # a tied embedding: equal copies on several ranks
    if tie_embeddings:
        state.setdefault("head.weight", state["embed.tokens.weight"])
    return state
