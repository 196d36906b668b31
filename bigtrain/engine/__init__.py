"""Engines run the optimizer step and own model/optimizer checkpoints: plain PyTorch on one process, or
DeepSpeed (data parallel, ZeRO 0-3) on any number of ranks. The trainer talks to both the same way."""

from bigtrain.engine.base import Engine

__all__ = ["Engine"]
