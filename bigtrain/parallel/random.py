"""Dropout randomness under tensor parallelism (the job of Megatron's RNG tracker, without tracker state).

Replicated regions (the residual stream, embeddings) must draw the same dropout mask on every tensor rank,
or the replicas drift apart; sharded regions (attention heads, the FFN hidden layer, sequence shards) must
draw different masks per rank, or every shard would reuse one mask. The trainer seeds the default
generators equally across the tensor ranks of a replica. Each call into a sharded region then

    1. draws one 62-bit seed s from the default CPU generator (same s on every tensor rank, so the
       replicated stream stays in step), and
    2. runs the region under a forked RNG seeded with mix(s, tensor rank), restoring the default
       generators afterwards.

No extra RNG state exists: checkpoints need only the default generators, and activation checkpointing's
recomputation (which restores the default generators) redraws s and so the same masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct ranks map distinct seeds far apart


def mix_seed(seed: int, rank: int) -> int:
    return (seed ^ ((rank + 1) * _GOLDEN)) % (2**63)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def run_with_rank_rng(fn: Callable, rank: int, args: tuple, kwargs: dict):
    """fn(*args, **kwargs) with its random draws from a stream of its own for this tensor rank."""
    seed = int(torch.randint(0, 2**62, (1,)))
    x = _first_tensor(args, kwargs)
    accelerated = x is not None and x.device.type not in ("cpu", "meta")
    devices = [x.device] if accelerated else []
    device_type = x.device.type if accelerated else "cuda"
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(mix_seed(seed, rank))
        return fn(*args, **kwargs)
