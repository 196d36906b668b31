"""How an unchanged model runs over many ranks. `parallelize` (the one entry point) applies, in order, tensor
and sequence parallelism (`tensor.py`), activation checkpointing (`activation_checkpointing.py`), torch.compile
of each block (`compile.py`) and the pipeline split (`pipeline.py`, `pipeline_module.py`), over the process
groups of one layout (`groups.py`); the collectives, per-rank dropout streams, sharded loss and gradient norms
these need live beside them."""

from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from bigtrain.parallel.parallelize import ParallelModel, parallelize

__all__ = ["ParallelModel", "apply_activation_checkpointing", "parallelize"]
