"""Optimizers (AdamW, LAMB) with decay / no-decay parameter groups, and learning-rate schedules."""

from bigtrain.optim.build import adamw_kwargs, build_optimizer, param_groups
from bigtrain.optim.lamb import Lamb
from bigtrain.optim.schedules import build_schedule, set_lr

__all__ = ["Lamb", "adamw_kwargs", "build_optimizer", "build_schedule", "param_groups", "set_lr"]
