"""DeepSpeed's MoE layer (`deepspeed.moe.layer.MoE`) beside bigtrain's (`MoEFeedForward`, `ExpertParallelMoE`),
holding the same weights: used by tests/test_deepspeed_moe.py, and spawned by it on 2 gloo ranks (`main`).

`DeepSpeedFFN` wraps DeepSpeed's layer so that it can stand where a block's feed-forward stands: DeepSpeed's
`MoE.forward` returns (output, l_aux, expert counts); the wrapper returns the output and keeps l_aux. Its router
weight and experts are copies of a bigtrain block's (each expert a deep copy of bigtrain's own `FeedForward`), so
the two differ only in their routing code. On the configuration where the semantics coincide (`SAME`: top-k
renormalized, dropless, no random token selection, no noisy gate, no sampled second expert) the outputs agree; the
load-balancing losses are related by

    top_k = 1, and top_k ≥ 3 (DeepSpeed's `topkgating`): l_aux = E · Σ_e f_e · P_e       = bigtrain's aux
    top_k = 2 (DeepSpeed's `top2gating`):                l_aux = E · Σ_e f¹_e · P_e      (`first_choice_aux`)

with f_e the share of all top-k assignments going to e, f¹_e the share of first choices only, P_e = mean_t p_te.

`main` (2 ranks, one expert group): DeepSpeed's layer with ep_size = 2 against bigtrain's expert-parallel layer on
each rank's own tokens — one forward and backward of the block, then a tiny causal LM trained by AdamW with each
MoE block replaced by one or the other, gradients averaged over the ranks by hand the same way for both (replicated
parameters: Σ over the ranks / 2; routed experts, whose gradients already hold both ranks' tokens: / 2). Rank 0
writes one JSON record per case.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigtrain.compat.deepspeed_import import import_deepspeed
from bigtrain.config import ModelConfig
from bigtrain.config.schema import MoEConfig
from bigtrain.distributed.rendezvous import DistEnv
from bigtrain.models.build import build_model
from bigtrain.models.moe import MoEFeedForward, Routing, moe_layers, route
from bigtrain.parallel.expert import ExpertParallelMoE, apply_expert_parallel, is_expert_parallel, mark_expert_parallel

D, D_FF, EXPERTS, VOCAB = 16, 24, 4, 64
# DeepSpeed's MoE arguments where its routing is bigtrain's dropless top-k (module docstring)
SAME = {"drop_tokens": False, "use_rts": False, "noisy_gate_policy": None, "top2_2nd_expert_sampling": False,
        "min_capacity": 0}


class DeepSpeedFFN(nn.Module):
    """DeepSpeed's MoE layer as a feed-forward sublayer: x [..., d] -> [..., d]; `l_aux` holds the last forward's
    load-balancing loss (DeepSpeed's formula, module docstring)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.l_aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.l_aux, _ = self.moe(x)
        return out


def deepspeed_twin(block: MoEFeedForward, ep_size: int = 1, rank: int = 0, capacity_factor: float = 1.0,
                   **options) -> DeepSpeedFFN:
    """DeepSpeed's MoE layer with `block`'s router weight and the experts rank·E/ep_size … of its routed experts
    (copies); `options` replace `SAME`'s. Under ep_size > 1 its expert group is DeepSpeed's, made here."""
    deepspeed = import_deepspeed()
    experts = block.experts
    moe = deepspeed.moe.layer.MoE(block.router.in_features, copy.deepcopy(experts[0]), num_experts=len(experts),
                                  ep_size=ep_size, k=block.top_k, capacity_factor=capacity_factor,
                                  eval_capacity_factor=capacity_factor, **{**SAME, **options})
    local = len(experts) // ep_size
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(block.router.weight)
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(experts[rank * local + i].state_dict())
    if ep_size > 1:
        moe.set_deepspeed_parallelism()
    return DeepSpeedFFN(moe)


def first_choice_aux(routing: Routing) -> torch.Tensor:
    """E · Σ_e f¹_e · P_e: DeepSpeed's top-2 l_aux, whose f¹_e counts first choices only."""
    n, e = routing.probs.shape
    first = torch.zeros(e).index_add_(0, routing.experts[:, 0], torch.ones(n)) / n
    return e * (first * routing.probs.mean(0)).sum()


def tiny_lm(top_k: int, aux_loss_coef: float, seed: int = 0) -> nn.Module:
    """A 2-block causal LM (pre-norm, rotary, SwiGLU, no biases, dropout 0) whose blocks are both MoE (dropless,
    no z-loss, no shared experts)."""
    cfg = ModelConfig(d_model=D, n_layers=2, n_heads=2, d_ff=D_FF, max_seq_len=16, dropout=0.0, positions="rotary",
                      norm_position="pre", activation="swiglu", bias=False,
                      moe=MoEConfig(experts=EXPERTS, top_k=top_k, d_ff=D_FF, aux_loss_coef=aux_loss_coef))
    return build_model(cfg, VOCAB, seed=seed)


def with_deepspeed_moe(model: nn.Module, **twin) -> nn.Module:
    """A copy of `model` whose MoE blocks are DeepSpeed's layer with the same weights (`deepspeed_twin`)."""
    model = copy.deepcopy(model)
    for block in model.blocks:
        if isinstance(block.ffn, MoEFeedForward):
            block.ffn = deepspeed_twin(block.ffn, **twin)
    return model


def batches(steps: int, rows: int, seed: int, length: int = 9) -> list[torch.Tensor]:
    """`steps` batches of `rows` learnable sequences: token t = (s + t · d) mod VOCAB, s random, d in {1, 2, 3}."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length)
    return [(torch.randint(0, VOCAB, (rows, 1), generator=g) + t * torch.randint(1, 4, (rows, 1), generator=g))
            % VOCAB for _ in range(steps)]


def lm_loss(model: nn.Module, ids: torch.Tensor, aux_loss_coef: float) -> torch.Tensor:
    """Mean next-token cross-entropy + aux_loss_coef · Σ over the MoE blocks of their load-balancing loss (bigtrain's
    `last.loss` has the coefficient in it already; DeepSpeed's `l_aux` does not)."""
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    for layer in model.modules():
        if isinstance(layer, MoEFeedForward):
            loss = loss + layer.last.loss
        elif isinstance(layer, DeepSpeedFFN):
            loss = loss + aux_loss_coef * layer.l_aux
    return loss


def train(model: nn.Module, data: list[torch.Tensor], aux_loss_coef: float,
          reduce: Callable[[nn.Module], None] | None = None) -> list[float]:
    """AdamW (lr 1e-2) over `data`, one batch a step; the loss of each step (`reduce` averages the gradients and
    the reported loss over ranks, when given)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for ids in data:
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, ids, aux_loss_coef)
        loss.backward()
        loss = loss.detach()
        if reduce is not None:
            reduce(model)
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        optimizer.step()
        losses.append(float(loss))
    return losses


def average_gradients(model: nn.Module) -> None:
    """The data-parallel average over the world (= one expert group): Σ g / world for replicated parameters, g / world
    for routed experts (each rank's own; their gradients already hold every rank's tokens)."""
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        routed = is_expert_parallel(p) or getattr(p, "allreduce", True) is False  # bigtrain's tag; DeepSpeed's
        if not routed:
            dist.all_reduce(p.grad)
        p.grad /= world


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def block_case(group, rank: int, world: int, top_k: int) -> dict:
    """One forward and backward of the expert-parallel block and DeepSpeed's (ep_size = world) on this rank's
    tokens: the largest relative differences of output, input gradient and every parameter gradient (reduced with
    MAX over the ranks), and both load-balancing losses against their formulas."""
    torch.manual_seed(5)
    block = MoEFeedForward(D, D_FF, "swiglu", False, 0.0, experts=EXPERTS, top_k=top_k)
    twin = deepspeed_twin(block, ep_size=world, rank=rank)
    ours = ExpertParallelMoE(copy.deepcopy(block), group, rank, world)
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(2, 5 + r, D, generator=g) for r in range(world)]
    up = [torch.randn(2, 5 + r, D, generator=g) for r in range(world)]
    x_ours, x_ds = xs[rank].clone().requires_grad_(), xs[rank].clone().requires_grad_()
    y_ours, y_ds = ours(x_ours), twin(x_ds)
    (y_ours * up[rank]).sum().backward()
    (y_ds * up[rank]).sum().backward()
    errors = {"out": _rel(y_ds, y_ours), "x_grad": _rel(x_ds.grad, x_ours.grad),
              "router_grad": _rel(twin.moe.deepspeed_moe.gate.wg.weight.grad, ours.router.weight.grad)}
    for i, expert in enumerate(twin.moe.deepspeed_moe.experts.deepspeed_experts):
        mine = ours.experts[str(rank * (EXPERTS // world) + i)]
        for (name, p), q in zip(expert.named_parameters(), mine.parameters(), strict=True):
            errors[f"expert{i}.{name}"] = _rel(p.grad, q.grad)
    aux = ours.last.aux
    expected = first_choice_aux(route_of(ours, xs[rank])) if top_k == 2 else aux
    errors["l_aux"] = _rel(twin.l_aux.detach(), expected)
    worst = torch.tensor([max(errors.values())], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return {"case": f"block-top{top_k}", "max_rel": float(worst), "l_aux": float(twin.l_aux.detach()),
            "aux": float(aux)}


def route_of(layer: MoEFeedForward, x: torch.Tensor) -> Routing:
    """The routing `layer` gives the tokens x [..., d]."""
    return route(layer.router(x.reshape(-1, x.shape[-1])).detach(), layer.top_k, layer.capacity_factor)


def curve_case(group, rank: int, world: int, top_k: int, aux_loss_coef: float, steps: int) -> dict:
    """The tiny LM trained `steps` steps on each rank's own batches with bigtrain's expert-parallel blocks and with
    DeepSpeed's (ep_size = world): both curves (the mean loss over the ranks)."""
    model = tiny_lm(top_k, aux_loss_coef)
    twin = with_deepspeed_moe(model, ep_size=world, rank=rank)
    apply_expert_parallel(model, group, rank, world)
    mark_expert_parallel(model)
    data = batches(steps, 2, seed=100 + rank)
    ours = train(model, data, aux_loss_coef, average_gradients)
    theirs = train(twin, data, aux_loss_coef, average_gradients)
    worst = max(abs(a - b) / abs(a) for a, b in zip(ours, theirs, strict=True))
    return {"case": f"curve-top{top_k}", "bigtrain": ours, "deepspeed": theirs, "max_rel": worst,
            "moe_layers": len(moe_layers(model))}


def main(rank: int, world: int, port: int, out_path: str, steps: int) -> None:
    from bigtrain.distributed.env import init_process_group, shutdown_process_group

    torch.set_num_threads(1)
    init_process_group(DistEnv(rank, rank, world, "test", "127.0.0.1", port), torch.device("cpu"))
    group = dist.new_group(list(range(world)))
    records = [block_case(group, rank, world, 2), block_case(group, rank, world, 3),
               curve_case(group, rank, world, 2, 0.0, steps), curve_case(group, rank, world, 3, 0.01, steps)]
    if rank == 0:
        with open(out_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    shutdown_process_group()
