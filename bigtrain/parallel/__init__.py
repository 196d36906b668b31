"""How an unchanged model runs over many ranks. `parallelize` (the one entry point) applies, in order, tensor
and sequence parallelism (`tensor.py`, `tensor_layers.py`, `tensor_sublayers.py`), activation checkpointing
(`activation_checkpointing.py`), torch.compile of each block (`compile.py`) and the pipeline split (`pipeline.py`,
`pipeline_module.py`), over the process groups of one layout (`bigtrain.distributed.groups`); the collectives,
per-rank dropout streams, sharded loss and gradient norms these need live beside them, and `validate.py` loads a
run's config with the check that needs a built model (`load_run_config`)."""

from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from bigtrain.parallel.parallelize import ParallelModel, parallelize

__all__ = ["ParallelModel", "apply_activation_checkpointing", "parallelize"]
