"""Functions that change how an unchanged model runs: activation checkpointing now, tensor/pipeline later."""

from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing

__all__ = ["apply_activation_checkpointing"]
