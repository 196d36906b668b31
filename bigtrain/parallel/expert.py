"""Expert parallelism (`parallel.expert` = EP): the routed experts of every MoE block split over an expert group
of EP data-parallel ranks, tokens sent to the rank of their expert and back by all-to-all.

The single-device block (`bigtrain.models.moe.MoEFeedForward`) is replaced by `ExpertParallelMoE`, which holds
the same router and shared experts and only its rank's E / EP routed experts: rank r of the group holds experts
r·E/EP, ..., (r+1)·E/EP − 1, kept under their global indices (`experts.5.up.weight` is expert 5 on every layout,
so initialization and checkpoints name experts the same way). Each rank routes its own tokens exactly as one
device routes that micro-batch (router, top-k, renormalized weights, capacity, aux and z losses all over the
rank's tokens), then:

    1. the kept assignments (token t, choice k, expert e), sorted by expert (stable: token order within one)
    2. counts c_e per expert; an all-to-all of the counts tells each rank how many rows it receives from each
       rank for each of its experts (read on the host: the row exchange takes its splits there)
    3. dispatch: the rows x_t to the rank owning e (`exchange_rows`, uneven splits)
    4. each local expert runs its received rows (from every rank of the group)
    5. combine: the outputs back by the inverse all-to-all; y_t = Σ_k w_tk · FFN_e(x_t) + Σ_s FFN_shared_s(x_t)

The gradient of an expert's weights on its rank is then Σ over the group's tokens routed to it; the engine sums
it over the expert-data group (the D / EP ranks holding the same experts), which together with the expert group
covers every data rank's tokens once. Every rank of a group must run every forward and backward together (both
exchanges run even when a rank sends or receives no rows).

Step 4 is one module, `LocalExperts` (the rank's experts, `experts.<e>` as before): every local expert runs on its
received rows, none included, so each gets a gradient (zeros when it had no rows) on every rank. FSDP2 shards that
module over the expert-data group and reduce-scatters the gradients that exist: the same set on every rank. Under
FSDP2 this form is used with EP = 1 too (an expert group of one: no exchange, the group is None), so that experts
unused by one data rank's tokens still reduce with the other ranks'.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.distributed.groups import ParallelGroups
from bigtrain.models.moe import MoEFeedForward, route
from bigtrain.parallel.collectives import exchange_rows


class LocalExperts(nn.ModuleDict):
    """A rank's routed experts under their global indices, run together: rows r of `rows` go through local expert
    `local_of_row[r]` (module docstring, step 4)."""

    def forward(self, rows: torch.Tensor, local_of_row: torch.Tensor) -> torch.Tensor:
        """rows [R, d], local_of_row [R] (index into this dict's order) -> [R, d]; every expert runs, on no rows
        when none came to it, so its weights get a gradient (zeros) whatever the routing."""
        outputs = rows * 0  # in the graph even when this rank received nothing: its backward exchange must run
        for index, expert in enumerate(self.values()):
            mine = torch.nonzero(local_of_row == index).squeeze(1)
            outputs = outputs.index_copy(0, mine, expert(rows[mine]).to(outputs.dtype))
        return outputs


class ExpertParallelMoE(MoEFeedForward):
    """An MoE block holding experts rank·E/EP .. (rank+1)·E/EP − 1 of its expert group (module docstring)."""

    def __init__(self, moe: MoEFeedForward, group, rank: int, size: int) -> None:
        """`group`: the expert group of `size` ranks (None when `size` is 1: no exchange)."""
        nn.Module.__init__(self)  # not MoEFeedForward's: the router and experts are `moe`'s own, not built anew
        n = len(moe.experts)
        if n % size:
            raise ValueError(f"{n} experts do not split over an expert group of {size} ranks")
        self.top_k, self.capacity_factor = moe.top_k, moe.capacity_factor
        self.aux_loss_coef, self.z_loss_coef = moe.aux_loss_coef, moe.z_loss_coef
        self.group, self.rank, self.size = group, rank, size
        self.n_experts, self.local = n, n // size
        self.router_loss_scale = moe.router_loss_scale
        self.router, self.shared = moe.router, moe.shared
        first = rank * self.local
        self.experts = LocalExperts({str(e): moe.experts[e] for e in range(first, first + self.local)})
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d] -> [..., d]; this rank's tokens through their experts wherever those live."""
        h = x.reshape(-1, x.shape[-1])
        routing = route(self.router(h), self.top_k, self.capacity_factor)
        token, slot = torch.nonzero(routing.kept, as_tuple=True)
        chosen = routing.experts[token, slot]
        order = torch.argsort(chosen, stable=True)
        token, slot, chosen = token[order], slot[order], chosen[order]
        if self.size == 1:  # every expert here: the sorted rows are this rank's own
            back = self.experts(h[token], chosen)
        else:
            counts = torch.bincount(chosen, minlength=self.n_experts)
            received = torch.empty_like(counts)
            dist.all_to_all_single(received, counts, group=self.group)  # [source rank, local expert]
            received = received.reshape(self.size, self.local)
            send, receive = counts.reshape(self.size, self.local).sum(1).tolist(), received.sum(1).tolist()
            rows = exchange_rows(h[token], send, receive, self.group)
            local_of_row = torch.arange(self.local, device=h.device).repeat(self.size).repeat_interleave(
                received.reshape(-1))
            back = exchange_rows(self.experts(rows, local_of_row), receive, send, self.group)
        out = torch.zeros_like(h).index_add(0, token, (back * routing.weights[token, slot, None]).to(h.dtype))
        for expert in self.shared:
            out = out + expert(h).to(out.dtype)
        return self.record(routing, out).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, experts {self.rank * self.local}..{(self.rank + 1) * self.local - 1} of "
                f"{self.n_experts} (expert group of {self.size})")


def apply_expert_parallel(model: nn.Module, group, rank: int, size: int) -> None:
    """Replace every MoE block of `model` (on the meta device) by its expert-parallel form for `rank` of an expert
    group of `size` ranks."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MoEFeedForward:
                setattr(parent, name, ExpertParallelMoE(child, group, rank, size))


def mark_expert_parallel(model: nn.Module) -> None:
    """Tag the routed experts' parameters (after materializing): their gradients are summed over the
    expert-data group, and the gradient norm sums their squares over the expert group."""
    for layer in model.modules():
        if isinstance(layer, ExpertParallelMoE):
            for p in layer.experts.parameters():
                p.expert_parallel = True


def is_expert_parallel(p: torch.Tensor) -> bool:
    return bool(getattr(p, "expert_parallel", False))


@torch.no_grad()
def reduce_gradients(parameters: list[nn.Parameter], groups: ParallelGroups, divide: int) -> None:
    """g ← Σ g / `divide` over the expert-data group for routed experts, over the data group for every other
    parameter (DeepSpeed's data-parallel average, with expert gradients summed only over the ranks that hold the
    same experts). A missing gradient counts as zeros, so every rank reduces the same buffers."""
    for expert, group in ((False, groups.data_group), (True, groups.expert_data_group)):
        chosen = [p for p in parameters if p.requires_grad and is_expert_parallel(p) == expert]
        for p in chosen:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not chosen:
            continue
        flat = torch.cat([p.grad.reshape(-1) for p in chosen])
        dist.all_reduce(flat, group=group)
        flat /= divide
        for p, piece in zip(chosen, flat.split([p.numel() for p in chosen]), strict=True):
            p.grad.copy_(piece.view_as(p.grad))
