"""Mixture-of-experts feed-forward block: a softmax router sends each token to top_k of E experts.

For the N tokens x_t of a micro-batch (every position, padding included), router logits z_t = W_r x_t (E values):

    p_t        = softmax(z_t)                                       router probabilities over the E experts
    S_t        = the top_k experts of p_t; w_te = p_te / Σ_{e'∈S_t} p_te'   (renormalized, as Mixtral)
    y_t        = Σ_{e∈S_t, kept} w_te · FFN_e(x_t) + Σ_s FFN_shared_s(x_t)

Dropless routing keeps every assignment. With a capacity factor cf > 0 each expert takes at most
C = ceil(cf · N · top_k / E) assignments, in the order: all first choices in token order, then all second choices,
...; an assignment beyond C is dropped (its weight is not given to the other choices), so a token whose every
choice was dropped gets only the shared experts, i.e. passes through the residual alone.

Auxiliary losses of one layer (the trainer adds coef · loss, summed over the MoE layers, to the training loss):

    f_e        = (assignments of the top-k routing to e, before any drop) / (N · top_k)     Σ_e f_e = 1
    P_e        = mean_t p_te
    aux        = E · Σ_e f_e · P_e          (Switch / GShard load balancing; 1 when perfectly balanced)
    z          = mean_t logsumexp(z_t)²     (router z-loss, ST-MoE)

The load of a layer: assigned_e = the top-k assignments to e (before any drop), kept_e = those the capacity limit
kept (Σ_e assigned_e = N · top_k; kept_e ≤ assigned_e; dropped fraction = 1 − Σ_e kept_e / (N · top_k)).

A layer keeps the values of its last forward in `last` (`RouterStats`), which the engine reads right after the
forward of a micro-batch (`take_router_stats`); nothing here knows about ranks or groups.

Where the training loss is formed away from the MoE layers (a pipeline stage: only the last one computes a loss),
an engine sets `router_loss_scale` = s on a layer instead of adding `last.loss` itself: the layer's output then
carries s · loss into the backward pass (`RouterLossInBackward`: the output unchanged in forward; in backward the
router loss also gets the gradient s), so ∇ of every layer's router loss reaches the weights as if s · loss had
been added to the training loss, with no stage passing it along.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bigtrain.models.layers import FeedForward


@dataclass
class RouterStats:
    """One forward's router numbers: `loss` = aux_loss_coef · aux + z_loss_coef · z keeps its graph (what joins
    the training loss); `aux`, `z` (detached) and `dropped`, the fraction of top-k assignments dropped by the
    capacity limit (0 when dropless), are reported (0-dim tensors); `assigned` and `kept` [E] (int64) count the
    top-k assignments per expert before and after the capacity limit."""

    loss: torch.Tensor
    aux: torch.Tensor
    z: torch.Tensor
    dropped: torch.Tensor
    assigned: torch.Tensor
    kept: torch.Tensor


@dataclass(frozen=True)
class Routing:
    """The routing of N tokens: `weights` [N, K] (renormalized, 0 at a dropped assignment), `experts` [N, K]
    (int64), `kept` [N, K] (bool), `probs` [N, E] and `logits` [N, E] (fp32, or fp64 for fp64 inputs)."""

    weights: torch.Tensor
    experts: torch.Tensor
    kept: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor


def capacity(tokens: int, top_k: int, experts: int, capacity_factor: float) -> int | None:
    """C = ceil(capacity_factor · tokens · top_k / experts); None when dropless (capacity_factor 0)."""
    if capacity_factor <= 0:
        return None
    return math.ceil(capacity_factor * tokens * top_k / experts)


def route(logits: torch.Tensor, top_k: int, capacity_factor: float = 0.0) -> Routing:
    """Top-k routing of router logits [N, E] (module docstring), with capacity dropping when capacity_factor > 0."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32
    n, e = logits.shape
    probs = logits.softmax(-1)
    top, experts = probs.topk(top_k, dim=-1)
    weights = top / top.sum(-1, keepdim=True)
    kept = torch.ones_like(experts, dtype=torch.bool)
    limit = capacity(n, top_k, e, capacity_factor)
    if limit is not None:
        # Position of each assignment in its expert's queue: choice rank first, then token order.
        order = experts.t().reshape(-1)  # [K·N]: all first choices, then all second choices, ...
        one_hot = nn.functional.one_hot(order, e)
        position = (one_hot.cumsum(0) - 1).gather(1, order[:, None]).squeeze(1)
        kept = (position < limit).reshape(top_k, n).t()
    return Routing(weights=weights * kept, experts=experts, kept=kept, probs=probs, logits=logits)


def expert_load(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(assigned, kept) [E] int64: per expert, the top-k assignments before the capacity limit and those it kept.
    Sums by index_add (bincount and boolean indexing would wait for the device, to size their results)."""
    chosen = routing.experts.reshape(-1)
    zeros = torch.zeros(routing.probs.shape[1], dtype=torch.int64, device=chosen.device)
    assigned = zeros.index_add(0, chosen, torch.ones_like(chosen))
    kept = zeros.index_add(0, chosen, routing.kept.reshape(-1).long())
    return assigned, kept


def balance_loss(routing: Routing) -> torch.Tensor:
    """E · Σ_e f_e · P_e, f_e = share of the top-k assignments (before drops) going to e, P_e = mean router prob."""
    n, e = routing.probs.shape
    counts = torch.zeros(e, device=routing.probs.device).index_add_(
        0, routing.experts.reshape(-1), torch.ones(routing.experts.numel(), device=routing.probs.device))
    f = counts / routing.experts.numel()
    return e * (f * routing.probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(z_t)² over the router logits [N, E] (at least fp32)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).logsumexp(-1).pow(2).mean()


class RouterLossInBackward(torch.autograd.Function):
    """y = out in forward; in backward ∂/∂out = the incoming gradient and ∂/∂loss = `scale`: the 0-dim router
    `loss` backpropagates as if `scale` · loss were a term of the training loss."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.loss_dtype = scale, loss.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=ctx.loss_dtype, device=grad.device), None


class MoEFeedForward(nn.Module):
    """A mixture of `experts` feed-forward networks (each as the dense block's FFN: the model's activation,
    SwiGLU included) behind a linear router, plus `shared` always-on experts."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool, dropout: float, experts: int,
                 top_k: int, shared: int = 0, capacity_factor: float = 0.0, aux_loss_coef: float = 0.0,
                 z_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, d_ff, activation, bias, dropout) for _ in range(experts))
        self.shared = nn.ModuleList(FeedForward(d_model, d_ff, activation, bias, dropout) for _ in range(shared))
        self.last: RouterStats | None = None
        # None: the engine adds `last.loss` to its loss; s: the output carries s · loss into backward (module docstring)
        self.router_loss_scale: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d] -> [..., d]; each token through its kept experts, weighted, plus the shared experts."""
        h = x.reshape(-1, x.shape[-1])
        routing = route(self.router(h), self.top_k, self.capacity_factor)
        out = torch.zeros_like(h)
        for index, expert in enumerate(self.experts):
            token, slot = torch.nonzero((routing.experts == index) & routing.kept, as_tuple=True)
            if token.numel() == 0:
                continue
            y = expert(h[token]) * routing.weights[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        for expert in self.shared:
            out = out + expert(h).to(out.dtype)
        return self.record(routing, out).reshape(x.shape)

    def record(self, routing: Routing, out: torch.Tensor) -> torch.Tensor:
        """Keep this forward's router losses, dropped fraction and expert load in `last` (`RouterStats`); returns
        `out`, carrying the router loss into backward when `router_loss_scale` is set (module docstring)."""
        aux, z = balance_loss(routing), z_loss(routing.logits)
        assigned, kept = expert_load(routing)
        loss = self.aux_loss_coef * aux + self.z_loss_coef * z
        self.last = RouterStats(loss=loss, aux=aux.detach(), z=z.detach(), dropped=(~routing.kept).float().mean(),
                                assigned=assigned, kept=kept)
        if self.router_loss_scale is not None and loss.requires_grad and torch.is_grad_enabled():
            return RouterLossInBackward.apply(out, loss, self.router_loss_scale)
        return out

    def extra_repr(self) -> str:
        return (f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, aux_loss_coef={self.aux_loss_coef}, "
            f"z_loss_coef={self.z_loss_coef}")


def is_moe_block(index: int, every: int) -> bool:
    """Whether block `index` (0-based, within its stack) is an MoE block: blocks every-1, 2·every-1, ..."""
    return (index + 1) % every == 0


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The MoE blocks of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def moe_layer_names(model: nn.Module) -> list[str]:
    """The block of each MoE layer of `model`, in `moe_layers`' order: its module path without the feed-forward's
    own name (`blocks.1`, `decoder_blocks.0`), the same on every layout."""
    return [name.rpartition(".")[0] or name for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def take_router_stats(layers: list[MoEFeedForward]) -> list[RouterStats]:
    """Each layer's record of its last forward, in order (the layers that ran one), taken: every layer's record is
    cleared, so the next micro-batch starts empty."""
    stats = [layer.last for layer in layers if layer.last is not None]
    for layer in layers:
        layer.last = None
    return stats


def collect_router_stats(layers: list[MoEFeedForward]) -> RouterStats | None:
    """Σ over the layers of their last forward's aux and z losses and expert load, and the mean dropped fraction;
    None when no layer ran a forward (the records are taken, as by `take_router_stats`)."""
    stats = take_router_stats(layers)
    if not stats:
        return None

    def total(name: str) -> torch.Tensor:
        return torch.stack([getattr(s, name) for s in stats]).sum(0)

    return RouterStats(loss=total("loss"), aux=total("aux"), z=total("z"), dropped=total("dropped") / len(stats),
                       assigned=total("assigned"), kept=total("kept"))
