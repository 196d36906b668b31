"""LAMB: Adam with a per-tensor trust ratio (You et al. 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", Algorithm 2).

For each parameter tensor w with gradient g, at step t (1-based):

    m = b1 * m + (1 - b1) * g              v = b2 * v + (1 - b2) * g^2
    m_hat = m / (1 - b1^t)                 v_hat = v / (1 - b2^t)
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
    ratio = ||w|| / ||r||   (1 if ||w|| == 0 or ||r|| == 0), then min(ratio, max_trust_ratio)
    w = w - lr * ratio * r

The trust ratio is applied in every group, including groups with weight_decay = 0 (biases, norms), as in
the paper's algorithm and NVIDIA's BERT recipe; some implementations (timm's `always_adapt=False`) skip it
there instead. A zero-initialised tensor gets ratio 1, i.e. a plain Adam step, until it moves off zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class Lamb(torch.optim.Optimizer):
    """LAMB with per-group `lr`, `betas`, `eps`, `weight_decay` and `max_trust_ratio` (None = unbounded).

    State per parameter: `step` (float32 scalar tensor, as in `torch.optim.Adam`), `exp_avg` (m) and
    `exp_avg_sq` (v). Subclasses override `_tensor_norms` to reduce the two norms over shards.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_trust_ratio: float | None = 10.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}; each must lie in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"Invalid eps: {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        if max_trust_ratio is not None and max_trust_ratio <= 0.0:
            raise ValueError(f"Invalid max_trust_ratio: {max_trust_ratio}; must be positive or None")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults)

    def _tensor_norms(self, p: Tensor, update: Tensor) -> tuple[Tensor, Tensor]:
        """(||w||_2, ||r||_2) of one parameter and its update; a ZeRO subclass all-reduces the squares."""
        return torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)

    def _trust_ratio(self, w_norm: Tensor, r_norm: Tensor, max_trust_ratio: float | None) -> Tensor:
        """||w|| / ||r||, 1 where either norm is 0, clamped to max_trust_ratio; stays on device."""
        one = torch.ones_like(w_norm)
        ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, one)
        if max_trust_ratio is not None:
            ratio = ratio.clamp(max=max_trust_ratio)
        return ratio

    supports_found_inf = True  # `found_inf` (a device tensor, 1 = skip) is honoured without reading it

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One LAMB update of every parameter that has a gradient; returns the closure's loss. When
        `self.found_inf` is set (a 0-dim device tensor), the update is computed and applied only where it is 0,
        on the device: a skipped step leaves weights and state bitwise unchanged, and nothing waits for it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if found_inf is None:
                    self._update(p, grad, state, group, beta1, beta2)
                else:
                    self._update_unless(found_inf, p, grad, state, group, beta1, beta2)
        return loss

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], beta1: float,
                beta2: float) -> None:
        state["step"] += 1
        t = int(state["step"].item())  # the step count lives on the host (as torch's Adam keeps it)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = exp_avg / (1 - beta1**t)
        v_hat = exp_avg_sq / (1 - beta2**t)
        update = m_hat.div_(v_hat.sqrt_().add_(group["eps"]))
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
        w_norm, r_norm = self._tensor_norms(p, update)
        ratio = self._trust_ratio(w_norm, r_norm, group["max_trust_ratio"])
        p.add_(update.mul_(ratio), alpha=-group["lr"])

    def _update_unless(self, found_inf: Tensor, p: Tensor, grad: Tensor, state: dict[str, Any],
                       group: dict[str, Any], beta1: float, beta2: float) -> None:
        """`_update` with every write masked by `found_inf` == 0, all on the device: the step count moves to
        the parameter's device (once) and the bias corrections 1 - β^t are computed there."""
        if state["step"].device != p.device:
            state["step"] = state["step"].to(p.device)
        step = state["step"]
        apply = found_inf.to(p.device) == 0
        t = step + 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        new_avg = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
        new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        update = (new_avg / (1 - beta1**t)).div_((new_avg_sq / (1 - beta2**t)).sqrt_().add_(group["eps"]))
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
        w_norm, r_norm = self._tensor_norms(p, update)
        ratio = self._trust_ratio(w_norm, r_norm, group["max_trust_ratio"])
        p.copy_(torch.where(apply, p - group["lr"] * (update * ratio), p))
        exp_avg.copy_(torch.where(apply, new_avg, exp_avg))
        exp_avg_sq.copy_(torch.where(apply, new_avg_sq, exp_avg_sq))
        step.add_(apply.to(step.dtype))
