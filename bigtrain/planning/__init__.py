"""Layout planning: will a config fit on N GPUs, how fast would each layout run, which one to choose."""

from bigtrain.planning.hardware import ACCELERATORS, Accelerator, accelerator
from bigtrain.planning.search import Estimate, Plan, make_plan
from bigtrain.planning.shape import ModelShape, model_shape

__all__ = ["ACCELERATORS", "Accelerator", "Estimate", "ModelShape", "Plan", "accelerator", "make_plan",
           "model_shape"]
