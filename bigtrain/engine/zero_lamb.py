"""LAMB that stays exact when DeepSpeed's ZeRO-1/2 flattens parameters into one fp32 partition per rank.

ZeRO hands the optimizer one flat tensor per parameter group: this rank's slice of the concatenation of the
group's parameters (with alignment padding). A plain LAMB would compute one trust ratio for that slice. Here
every element is labelled with the parameter it belongs to (a segment id); per-parameter sums of squares of
w and of the update are computed with scatter_add over this rank's slice and all-reduced over the
data-parallel group, giving ||w|| and ||r|| of every whole parameter, so each element gets its parameter's
ratio ||w|| / ||r|| exactly as unsharded LAMB does (up to floating-point summation order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bigtrain.optim.lamb import Lamb


class ZeroLamb(Lamb):
    """LAMB whose norms of flat ZeRO partitions are per original parameter, reduced over ranks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.segments: dict[int, tuple[Tensor, int]] = {}
        self.group: dist.ProcessGroup | None = None

    def attach_zero_partitions(self, zero_optimizer: object, group: dist.ProcessGroup) -> None:
        """Label the elements of each flat partition of a DeepSpeedZeroOptimizer (stage 1 or 2)."""
        rank = dist.get_rank(group=group)
        self.group = group
        for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            size = zero_optimizer.partition_size[i]
            offsets = zero_optimizer.round_robin_bit16_offsets[i]
            metas = zero_optimizer.round_robin_bit16_meta[i]
            n = len(metas)
            seg = torch.full((flat.numel(),), n, dtype=torch.long, device=flat.device)  # n = padding
            lo, hi = rank * size, rank * size + flat.numel()
            for j, (offset, meta) in enumerate(zip(offsets, metas, strict=True)):
                a, b = max(offset, lo), min(offset + meta.numel(), hi)
                if a < b:
                    seg[a - lo:b - lo] = j
            self.segments[id(flat)] = (seg, n + 1)

    def _tensor_norms(self, p: Tensor, update: Tensor) -> tuple[Tensor, Tensor]:
        info = self.segments.get(id(p))
        if info is None:
            return super()._tensor_norms(p, update)
        seg, n = info
        squares = torch.zeros(2, n, dtype=torch.float32, device=p.device)
        squares[0].scatter_add_(0, seg, p.float().square())
        squares[1].scatter_add_(0, seg, update.float().square())
        # With optimizer offload the partition lives on the CPU, but nccl reduces only GPU tensors.
        on_gpu = dist.get_backend(self.group) == "nccl"
        reduced = squares.cuda() if on_gpu else squares
        dist.all_reduce(reduced, group=self.group)
        norms = reduced.to(p.device).sqrt()
        return norms[0][seg], norms[1][seg]
