"""Spawned by tests/test_expert_parallel.py (torch.multiprocessing, gloo, EP ranks = one expert group): the
expert-parallel MoE block (`ExpertParallelMoE`) on this rank's tokens against the one-device block
(`MoEFeedForward`) on the same tokens, float64.

Every rank builds the same one-device block and draws every rank's tokens and upstream gradient from one seed.
The reference runs each rank's tokens as a micro-batch of its own and sums the gradients; the parallel block
runs this rank's micro-batch, its router and shared-expert gradients summed over the group (as the data-parallel
reduction does), its routed experts' gradients as they are (they already hold every rank's tokens). Rank 0
writes one JSON line per case with the largest difference of the output, the input gradient, the router
losses and every parameter gradient, relative to the reference's largest magnitude, reduced with MAX, and whether
every rank's expert load (assigned and kept per expert) equals the reference's on the same tokens.
"""

from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist

from bigtrain.models.moe import MoEFeedForward, route
from bigtrain.parallel.expert import ExpertParallelMoE

D, D_FF, EXPERTS, TOKENS = 8, 12, 4, (5, 3)
# name: (top_k, capacity_factor, shared experts, starve): starve makes the router never pick the experts of the
# last rank, so that rank receives no rows (its exchanges must still run, forward and backward)
CASES = {"dropless": (2, 0.0, 1, False), "capacity": (2, 1.0, 0, False), "top1-capacity": (1, 1.25, 1, False),
         "last-rank-starved": (2, 0.0, 1, True)}


def _loss(block: MoEFeedForward, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (block(x) * up).sum() + block.last.loss


def compare(name: str, group, world: int, rank: int) -> dict:
    top_k, capacity, shared, starve = CASES[name]
    torch.manual_seed(7)
    ref = MoEFeedForward(D, D_FF, "swiglu", False, 0.0, experts=EXPERTS, top_k=top_k, shared=shared,
                         capacity_factor=capacity, aux_loss_coef=0.01, z_loss_coef=0.001).double()
    if starve:
        with torch.no_grad():
            ref.router.weight[-EXPERTS // world:] = 0.0
            ref.router.weight[:-EXPERTS // world] = ref.router.weight[:-EXPERTS // world].abs() + 1.0
    block = ExpertParallelMoE(copy.deepcopy(ref), group, rank, world)
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(2, TOKENS[r % 2], D, generator=g, dtype=torch.float64).abs() for r in range(world)]
    ups = [torch.randn(2, TOKENS[r % 2], D, generator=g, dtype=torch.float64) for r in range(world)]
    ref_x = [x.clone().requires_grad_() for x in xs]
    ref_out, ref_aux, ref_load = [], [], []
    for x, up in zip(ref_x, ups, strict=True):
        _loss(ref, x, up).backward()
        ref_out.append(ref(x.detach()).detach())
        ref_aux.append(ref.last.aux)
        ref_load.append(torch.cat([ref.last.assigned, ref.last.kept]))
    x = xs[rank].clone().requires_grad_()
    _loss(block, x, ups[rank]).backward()
    out = block(x.detach()).detach()
    errors = {"out": (out - ref_out[rank]).abs().max() / ref_out[rank].abs().max(),
              "x_grad": (x.grad - ref_x[rank].grad).abs().max() / ref_x[rank].grad.abs().max(),
              "aux": (block.last.aux - ref_aux[rank]).abs() / ref_aux[rank]}
    reference = dict(ref.named_parameters())
    for pname, p in block.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if not pname.startswith("experts."):
            dist.all_reduce(grad, group=group)
        want = reference[pname].grad if reference[pname].grad is not None else torch.zeros_like(p)
        errors[pname] = (grad - want).abs().max() / max(want.abs().max(), 1e-30)
    worst = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in errors.values()]).max().reshape(1)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    same_load = torch.tensor([int(torch.equal(torch.cat([block.last.assigned, block.last.kept]), ref_load[rank]))])
    dist.all_reduce(same_load, op=dist.ReduceOp.MIN, group=group)
    last_rank = sum(int((route(ref.router(x.reshape(-1, D)), top_k).experts >= EXPERTS - EXPERTS // world).sum())
                    for x in xs)
    return {"case": name, "max_rel": float(worst), "local_experts": sorted(block.experts.keys()),
            "assignments_to_last_rank": last_rank, "same_load": bool(same_load)}


def main(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    records = [compare(name, group, world, rank) for name in CASES]
    if rank == 0:
        with open(out_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    dist.barrier(group=group)
    dist.destroy_process_group()
