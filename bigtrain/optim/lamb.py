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

The arithmetic runs on all tensors of a group at once (torch's multi-tensor `_foreach_*` kernels: a few
launches per group instead of a dozen per tensor) where the norms are plain per-tensor norms; subclasses that
reduce norms over shards (`ZeroLamb`) and `foreach=False` take the per-tensor path. Both compute the same
formula in the same order; only the norms' summation order may differ in the last bits.
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
        foreach: bool | None = None,
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
        self.foreach = foreach  # None: multi-tensor wherever the plain per-tensor norms apply

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
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self._multi_tensor(params, found_inf):
                self._update_all(params, group, beta1, beta2, found_inf)
                continue
            for p in params:
                if found_inf is None:
                    self._update(p, p.grad, self.state[p], group, beta1, beta2)
                else:
                    self._update_unless(found_inf, p, p.grad, self.state[p], group, beta1, beta2)
        return loss

    def _multi_tensor(self, params: list[Tensor], found_inf: Tensor | None = None) -> bool:
        if self.foreach is False or type(self)._tensor_norms is not Lamb._tensor_norms or len(params) < 2:
            return False
        first = params[0]
        if not all(p.device == first.device and p.dtype == first.dtype for p in params):
            return False
        if found_inf is not None:  # step counts per tensor on the device: nothing to read here
            return True
        # the host path shares one step count t over the group's update
        return len({float(self.state[p].get("step", 0.0)) for p in params}) <= 1

    def _update_all(self, params: list[Tensor], group: dict[str, Any], beta1: float, beta2: float,
                    found_inf: Tensor | None) -> None:
        """`_update` / `_update_unless` of every tensor of a group with multi-tensor kernels."""
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        avgs, avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        device = params[0].device
        if found_inf is None:
            for s in states:
                s["step"] += 1
            t = int(states[0]["step"].item())  # on the host, as in `_update`
            correction1: Any = 1 - beta1**t
            correction2: Any = 1 - beta2**t
            torch._foreach_mul_(avgs, beta1)
            torch._foreach_mul_(avg_sqs, beta2)
            new_avg, new_avg_sq = avgs, avg_sqs  # in place
        else:  # step counts on the device, one per tensor; nothing is written unless found_inf == 0
            for s in states:
                if s["step"].device != device:
                    s["step"] = s["step"].to(device)
            steps = torch.stack([s["step"] for s in states]) + 1
            correction1 = list((1 - beta1**steps).unbind(0))
            correction2 = list((1 - beta2**steps).unbind(0))
            new_avg, new_avg_sq = torch._foreach_mul(avgs, beta1), torch._foreach_mul(avg_sqs, beta2)
        torch._foreach_add_(new_avg, grads, alpha=1 - beta1)
        torch._foreach_addcmul_(new_avg_sq, grads, grads, value=1 - beta2)
        update = torch._foreach_div(new_avg, correction1)
        denom = torch._foreach_div(new_avg_sq, correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_div_(update, denom)
        if group["weight_decay"] != 0:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        w_norms = torch.stack(torch._foreach_norm(params))
        r_norms = torch.stack(torch._foreach_norm(update))
        ratios = list(self._trust_ratio(w_norms, r_norms, group["max_trust_ratio"]).unbind(0))
        torch._foreach_mul_(update, ratios)
        if found_inf is None:
            torch._foreach_add_(params, update, alpha=-group["lr"])
            return
        apply = found_inf.to(device) == 0
        for p, u, avg, avg_sq, a, a_sq in zip(params, update, avgs, avg_sqs, new_avg, new_avg_sq, strict=True):
            p.copy_(torch.where(apply, p - group["lr"] * u, p))
            avg.copy_(torch.where(apply, a, avg))
            avg_sq.copy_(torch.where(apply, a_sq, avg_sq))
        torch._foreach_add_([s["step"] for s in states], apply.to(states[0]["step"].dtype))

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
