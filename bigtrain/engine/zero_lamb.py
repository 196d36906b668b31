"""LAMB that stays exact when parameters are cut into pieces: ZeRO-1/2 partitions and tensor-parallel shards.

ZeRO hands the optimizer one flat tensor per parameter group: this rank's slice of the concatenation of the
group's parameters (with alignment padding). A plain LAMB would compute one trust ratio for that slice. Here
every element is labelled with the parameter it belongs to (a segment id); per-parameter sums of squares of
w and of the update are computed with scatter_add over this rank's slice and all-reduced over the
data-parallel group, giving ||w|| and ||r|| of every whole parameter, so each element gets its parameter's
ratio ||w|| / ||r|| exactly as unsharded LAMB does (up to floating-point summation order).

Under tensor parallelism a parameter's shards live on the ranks of the tensor group: for parameters marked
`tensor_model_parallel` the sums of squares are also all-reduced over that group (replicated parameters are
whole on every rank and are not).

Under fairscale's FullyShardedDataParallel every tensor the optimizer holds is this rank's flat shard of one
parameter (zero-padded at the end: the padding's weight, gradient, moments and update all stay 0), and under
FSDP2 this rank's rows of one parameter, so with `shard_group` the two sums of squares of each tensor are
all-reduced over that (data) group first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bigtrain.compat.deepspeed import zero_partitions
from bigtrain.optim.lamb import Lamb
from bigtrain.parallel.tensor import is_tensor_parallel


class ZeroLamb(Lamb):
    """LAMB whose norms of flat ZeRO partitions and of tensor shards are those of whole parameters."""

    def __init__(self, *args, tensor_group: dist.ProcessGroup | None = None,
                 shard_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.segments: dict[int, tuple[Tensor, int, Tensor]] = {}
        self.group: dist.ProcessGroup | None = None
        self.tensor_group, self.shard_group = tensor_group, shard_group

    def attach_zero_partitions(self, zero_optimizer: object, group: dist.ProcessGroup) -> None:
        """Label the elements of each flat partition of a DeepSpeedZeroOptimizer (stage 1 or 2)."""
        rank = dist.get_rank(group=group)
        self.group = group
        for part in zero_partitions(zero_optimizer):
            flat, n = part.flat, len(part.numels)
            seg = torch.full((flat.numel(),), n, dtype=torch.long, device=flat.device)  # n = padding
            lo, hi = rank * part.size, rank * part.size + flat.numel()
            for j, (offset, numel) in enumerate(zip(part.offsets, part.numels, strict=True)):
                a, b = max(offset, lo), min(offset + numel, hi)
                if a < b:
                    seg[a - lo:b - lo] = j
            sharded = torch.tensor([is_tensor_parallel(p) for p in part.params] + [False], device=flat.device)
            self.segments[id(flat)] = (seg, n + 1, sharded)

    def _all_reduce(self, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        # With optimizer offload the partition lives on the CPU, but nccl reduces only GPU tensors.
        on_gpu = dist.get_backend(group) == "nccl"
        reduced = t.cuda() if on_gpu else t
        dist.all_reduce(reduced, group=group)
        return reduced.to(t.device)

    def _tensor_norms(self, p: Tensor, update: Tensor) -> tuple[Tensor, Tensor]:
        info = self.segments.get(id(p))
        if info is None:  # a whole parameter, its tensor shard, or an FSDP shard of either
            across_tensor = self.tensor_group is not None and is_tensor_parallel(p)
            if self.shard_group is None and not across_tensor:
                return super()._tensor_norms(p, update)
            squares = torch.stack([p.float().square().sum(), update.float().square().sum()])
            if self.shard_group is not None:
                squares = self._all_reduce(squares, self.shard_group)
            if across_tensor:
                squares = self._all_reduce(squares, self.tensor_group)
            norms = squares.sqrt()
            return norms[0], norms[1]
        seg, n, sharded = info
        squares = torch.zeros(2, n, dtype=torch.float32, device=p.device)
        squares[0].scatter_add_(0, seg, p.float().square())
        squares[1].scatter_add_(0, seg, update.float().square())
        squares = self._all_reduce(squares, self.group)
        if self.tensor_group is not None and bool(sharded.any()):
            across = self._all_reduce(squares * sharded, self.tensor_group)
            squares = torch.where(sharded, across, squares)
        norms = squares.sqrt()
        return norms[0][seg], norms[1][seg]
