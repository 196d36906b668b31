"""ZeroLamb on a flat ZeRO-style partition equals per-tensor LAMB; a plain LAMB on the same flat tensor
(one trust ratio for the whole shard, DeepSpeed issues #88 / #490) does not."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from bigtrain.engine.zero_lamb import ZeroLamb
from bigtrain.optim.lamb import Lamb


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, generator=gen) * 3.0, torch.randn(5, generator=gen) * 0.1,
            torch.zeros(2, 2), torch.randn(7, generator=gen)]


def _flat_with_padding(tensors: list[torch.Tensor], align: int = 4) -> tuple[torch.Tensor, list[int]]:
    """Concatenate like ZeRO does, with zero padding after each tensor to an aligned offset."""
    offsets, pieces, pos = [], [], 0
    for t in tensors:
        offsets.append(pos)
        pad = (-t.numel()) % align
        pieces += [t.flatten(), torch.zeros(pad)]
        pos += t.numel() + pad
    return torch.cat(pieces), offsets


def _run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


def test_zero_lamb_matches_per_tensor_lamb(gloo_world_of_one):
    tensors = _tensors()
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(t.shape, generator=gen) for t in tensors] for _ in range(4)]
    kw = dict(lr=0.05, weight_decay=0.01, max_trust_ratio=None)

    reference = [t.clone().requires_grad_() for t in tensors]
    _run(Lamb(reference, **kw), reference, grads)

    flat, offsets = _flat_with_padding(tensors)
    flat_grads = [[_flat_with_padding(g)[0]] for g in grads]
    sharded = flat.clone().requires_grad_()
    zero = ZeroLamb([sharded], **kw)
    fake = types.SimpleNamespace(single_partition_of_fp32_groups=[sharded], partition_size=[flat.numel()],
                                 round_robin_bit16_offsets=[offsets],
                                 round_robin_bit16_meta=[[torch.empty(t.shape, device="meta") for t in tensors]],
                                 round_robin_bit16_groups=[tensors])
    zero.attach_zero_partitions(fake, gloo_world_of_one)
    _run(zero, [sharded], flat_grads)

    naive = flat.clone().requires_grad_()
    _run(Lamb([naive], **kw), [naive], flat_grads)

    expected = _flat_with_padding([t.detach() for t in reference])[0]
    assert (sharded.detach() - expected).abs().max() <= 1e-6
    assert (naive.detach() - expected).abs().max() > 1e-3  # one ratio per shard is wrong
