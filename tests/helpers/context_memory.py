"""Spawned by tests/test_context_training.py (torch.multiprocessing, gloo, C ranks = one context group): the
activation bytes one rank of the whole model keeps for backward during a training micro-batch, at C ranks.

Every rank builds the model through `parallelize` (its attention cores the context-parallel ones), takes its share
of the same micro-batch (`ContextInputs.split`) and measures with `SavedActivationMeter` (distinct storages saved
by autograd, parameters excluded) the peak over forward and backward of Σ ce. With C = 1 (`world` 1) the plain
model on the whole micro-batch. Rank 0 writes {"context", "peak", "algorithm"} as one JSON line per algorithm.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.config.layout import resolve_layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.models import build_model
from bigtrain.models.loss import cross_entropy_sum, model_inputs
from bigtrain.parallel import parallelize
from tests.helpers.saved_activations import SavedActivationMeter

SEQ, BATCH, VOCAB = 512, 2, 256
MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=256", "model.dropout=0.0",
         f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}", "model.positions=rotary", "model.norm_position=pre"]


def peak_bytes(world: int, rank: int, algorithm: str) -> int:
    cfg = load_config(None, [*MODEL, f"parallel.context={world}", f"parallel.context_attention={algorithm}"],
                      world_size=world)
    groups = ParallelGroups(resolve_layout(cfg, world), rank) if world > 1 else None
    parallel = parallelize(build_model(cfg.model, VOCAB, "meta"), cfg, groups, "cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if parallel.context is not None:
        batch = parallel.context.split(batch)
    model = parallel.model
    meter = SavedActivationMeter(model)
    with meter.measuring():
        loss = cross_entropy_sum(model(**model_inputs(batch)), batch["labels"])
    loss.backward()
    if parallel.context is not None:
        parallel.context.clear()
    return meter.peak


def main(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    lines = [{"context": world, "algorithm": a, "peak": peak_bytes(world, rank, a)} for a in ("ring", "ulysses")]
    if rank == 0:
        with open(out_path, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    if world > 1:
        dist.destroy_process_group()
