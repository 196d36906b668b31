"""Engines run the optimizer step and own model/optimizer checkpoints: plain PyTorch on one process, DeepSpeed
(data parallel, ZeRO 0-3) on any number of ranks, or DeepSpeed's pipeline engine. Each receives the result of
`bigtrain.parallel.parallelize`; the trainer talks to all of them the same way (`Engine`)."""

from bigtrain.engine.base import Engine
from bigtrain.engine.build import build_engine

__all__ = ["Engine", "build_engine"]
