"""Build the optimizer from `OptimConfig`, with weight decay only on matrices.

Two parameter groups, always both present (so the state-dict layout does not depend on the model):
`decay` holds every trainable parameter with ndim >= 2 (linear and embedding weights) and gets
`cfg.weight_decay`; `no_decay` holds those with ndim < 2 (biases, norm gains) and gets 0.
"""

from __future__ import annotations

from typing import Any

import torch

from bigtrain.config.schema import OptimConfig
from bigtrain.errors import ConfigError
from bigtrain.optim.lamb import Lamb


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The `decay` / `no_decay` groups of `model`'s trainable parameters, each tied tensor once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # deduplicates tied parameters
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # a pipeline stage may hold no tensors of one kind


def adamw_kwargs(params: list[torch.Tensor], **hyper: Any) -> dict[str, Any]:
    """AdamW's keyword arguments: fused (one kernel per step on CUDA and CPU; it also skips a step on the device
    when given `found_inf`) where this torch and device have it, else the multi-tensor implementation."""
    if params and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params):
        try:  # torch checks fused support when the optimizer is built
            torch.optim.AdamW([torch.zeros(1, device=params[0].device, dtype=params[0].dtype)], fused=True)
            return {**hyper, "fused": True}
        except (RuntimeError, ValueError):
            pass
    return {**hyper, "foreach": True}


def adamw(groups: list[dict[str, Any]], **hyper: Any) -> torch.optim.Optimizer:
    """torch's AdamW over `groups`, fused where possible (`adamw_kwargs`)."""
    return torch.optim.AdamW(groups, **adamw_kwargs([p for g in groups for p in g["params"]], **hyper))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lamb_class: type[Lamb] = Lamb) -> torch.optim.Optimizer:
    """AdamW or LAMB over `param_groups(model, cfg.weight_decay)` with `cfg`'s lr, betas and eps.

    `lamb_class` lets an engine substitute a LAMB that reduces its norms across shards.
    """
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw":
        return adamw(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.name == "lamb":
        return lamb_class(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, max_trust_ratio=cfg.lamb_max_trust_ratio)
    raise ConfigError(f"optim.name={cfg.name!r} is not a known optimizer; choose 'adamw' or 'lamb'.")
