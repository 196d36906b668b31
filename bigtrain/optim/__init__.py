"""Optimizers (AdamW, LAMB) with decay / no-decay parameter groups, and learning-rate schedules."""

from bigtrain.optim.build import build_optimizer
from bigtrain.optim.lamb import Lamb
from bigtrain.optim.schedules import build_schedule, set_lr

__all__ = ["Lamb", "build_optimizer", "build_schedule", "set_lr"]
