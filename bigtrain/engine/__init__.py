"""Engines run the optimizer step: the plain one on one process (`local.py`), DeepSpeed's data-parallel / ZeRO and
pipeline engines (`deepspeed/`), fairscale's sharded engines (`fairscale/`). Every engine runs the one step
skeleton (`step.py`) and answers the same calls (`base.Engine`); `build_engine` picks the one the resolved layout
names."""

from bigtrain.engine.base import Engine
from bigtrain.engine.build import build_engine

__all__ = ["Engine", "build_engine"]
