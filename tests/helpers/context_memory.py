"""Spawned by tests/test_context_training.py (torch.multiprocessing, gloo, C ranks = one context group): the
activation bytes one rank of the whole model keeps for backward during a training micro-batch, at C ranks.

The measurement is the long-context benchmark's (`bench.long_context.measure_rank`): every rank builds the model
through `parallelize` (its attention cores the context-parallel ones), takes its share of the same micro-batch
(`ContextInputs.split`) and measures with `SavedActivationMeter` (distinct storages saved by autograd, parameters
excluded) the peak over forward and backward of Σ ce. With C = 1 (`world` 1) the plain model on the whole
micro-batch. Rank 0 writes {"context", "peak", "algorithm"} as one JSON line per algorithm.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from bench.long_context import Model, measure_rank

SEQ, BATCH = 512, 2


def peak_bytes(world: int, rank: int, algorithm: str) -> int:
    return measure_rank(Model(d_model=64, layers=2, heads=4).overrides(SEQ, BATCH, world, algorithm), world, rank).peak


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
