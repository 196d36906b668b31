"""Cross-entropy over vocabulary-sharded logits, without ever gathering the full logits.

Rank r holds z_v for v in its slice of the vocabulary. For a target y:

    m = max_v z_v                    (all-reduce MAX of the local maxima)
    S = Σ_v exp(z_v - m)             (all-reduce SUM of the local sums)
    z_y - m                          (the rank owning y contributes it, others 0; all-reduce SUM)
    loss = log S - (z_y - m)
    ∂loss/∂z_v = softmax(z)_v - [v = y]   (local: exp(z_v - m) / S minus 1 at y if this rank owns it)

Communication per token: three scalars, independent of the vocabulary size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bigtrain.models.loss import IGNORE_INDEX, Criterion
from bigtrain.parallel.collectives import gather_last_dim


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group, start: int) -> torch.Tensor:
        """logits [N, V/T] (fp32), labels [N] global ids (-100 = ignore) -> per-token loss [N] (0 at ignored)."""
        local_vocab = logits.shape[-1]
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        valid = labels != IGNORE_INDEX
        local = labels - start
        owned = (local >= 0) & (local < local_vocab) & valid
        local = local.clamp(0, local_vocab - 1)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * owned
        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1), target])
        dist.all_reduce(sums, group=group)
        sum_exp, target = sums[0], sums[1]
        loss = (sum_exp.log() - target) * valid
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, owned, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local, owned, valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local.unsqueeze(-1), -owned.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None


class VocabParallelCriterion(Criterion):
    """Loss, predictions and full logits for logits [.., V/T] cut by vocabulary over a tensor group."""

    def __init__(self, group, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start = self.rank * logits.shape[-1]
        flat = logits.float().flatten(0, -2)
        return _VocabParallelCrossEntropy.apply(flat, labels.flatten(), self.group, start).sum()

    @torch.no_grad()
    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """argmax over the whole vocabulary; ties go to the lowest id, as torch.argmax does."""
        local_max, local_arg = logits.float().max(dim=-1)
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=self.group)
        none = torch.iinfo(torch.long).max
        candidate = torch.where(local_max == global_max, local_arg + self.rank * logits.shape[-1],
                                torch.full_like(local_arg, none))
        dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=self.group)
        return candidate

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(logits.contiguous(), self.group)
