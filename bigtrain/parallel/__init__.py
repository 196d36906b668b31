"""Functions that change how an unchanged model runs: activation checkpointing, tensor and sequence
parallelism (`tensor.py`), pipeline stages (`pipeline.py`), over the process groups of one layout (`layout.py`)."""

from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing"]
