"""Learning-rate schedules as pure functions of the 1-based optimizer step.

Notation: lr = peak learning rate, W = warmup steps, T = total steps, r = min_lr_ratio, and after warmup
the decay progress p = clamp((step - W) / max(1, T - W), 0, 1).

    noam      noam_scale * d_model^-0.5 * min(step^-0.5, step * W^-1.5)   (ignores lr; peak at step W)
    constant  lr * min(1, step / W)
    cosine    lr * step / W while step <= W, then lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)
    linear    lr * step / W while step <= W, then lr * (r + (1 - r) * (1 - p))
    wsd       lr * step / W while step <= W, lr until step T - D with D = round(decay_fraction * T),
              then lr * (r + (1 - r) * (T - step) / D), reaching r * lr at step T

W = 0 means no warmup. Steps past T keep the final value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from bigtrain.config.schema import ScheduleConfig
from bigtrain.errors import ConfigError

Schedule = Callable[[int], float]


def noam(step: int, d_model: int, warmup: int, scale: float) -> float:
    """scale * d_model^-0.5 * min(step^-0.5, step * W^-1.5); W = 0 gives the decay term alone."""
    decay = step**-0.5
    ramp = step * warmup**-1.5 if warmup > 0 else math.inf
    return scale * d_model**-0.5 * min(decay, ramp)


def constant(step: int, lr: float, warmup: int) -> float:
    """lr * min(1, step / W)."""
    return lr * min(1.0, step / warmup) if warmup > 0 else lr


def cosine(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)."""
    if step <= warmup:
        return lr * step / warmup
    p = _progress(step, warmup, total)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def linear(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then lr * (r + (1 - r) * (1 - p))."""
    if step <= warmup:
        return lr * step / warmup
    p = _progress(step, warmup, total)
    return lr * (min_ratio + (1 - min_ratio) * (1 - p))


def wsd(step: int, lr: float, warmup: int, total: int, min_ratio: float, decay_steps: int) -> float:
    """Warmup-stable-decay: warmup, lr until T - D, then linear from lr to r * lr at step T."""
    if step <= warmup:
        return lr * step / warmup
    decay_start = total - decay_steps
    if decay_steps <= 0 or step <= decay_start:
        return lr
    left = max(0, total - step) / decay_steps  # 1 at the decay start, 0 at T
    return lr * (min_ratio + (1 - min_ratio) * left)


def _progress(step: int, warmup: int, total: int) -> float:
    """p = clamp((step - W) / max(1, T - W), 0, 1)."""
    return min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))


def build_schedule(cfg: ScheduleConfig, peak_lr: float, total_steps: int, d_model: int) -> Schedule:
    """`lr_at(step)` for step >= 1 of the schedule `cfg.name` (see the module docstring)."""
    w, r = cfg.warmup_steps, cfg.min_lr_ratio
    if cfg.name == "noam":
        fn: Schedule = partial(noam, d_model=d_model, warmup=w, scale=cfg.noam_scale)
    elif cfg.name == "constant":
        fn = partial(constant, lr=peak_lr, warmup=w)
    elif cfg.name == "cosine":
        fn = partial(cosine, lr=peak_lr, warmup=w, total=total_steps, min_ratio=r)
    elif cfg.name == "linear":
        fn = partial(linear, lr=peak_lr, warmup=w, total=total_steps, min_ratio=r)
    elif cfg.name == "wsd":
        decay = round(cfg.decay_fraction * total_steps)
        fn = partial(wsd, lr=peak_lr, warmup=w, total=total_steps, min_ratio=r, decay_steps=decay)
    else:
        raise ConfigError(f"schedule.name={cfg.name!r} is not a known schedule; choose one of "
                          "'noam', 'cosine', 'linear', 'constant', 'wsd'.")

    def lr_at(step: int) -> float:
        if step < 1:
            raise ValueError(f"learning-rate schedules take the 1-based optimizer step, got {step}")
        return fn(step)

    return lr_at


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group to `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
