"""What the trainer needs from an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from bigtrain.engine.result import StepResult
from bigtrain.models import TransformerLM


class Engine(Protocol):
    model: TransformerLM  # the module to run for evaluation and sampling (the pipeline engine, whose
    # module is one stage, evaluates through its own `evaluate(batches)` instead)
    rank: int
    dp_rank: int
    dp_size: int

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool,
                   counts: tuple[int, int] | None = None) -> StepResult:
        """Forward/backward this rank's micro-batches of the global batch and apply one update at `lr`."""

    def save(self, directory: Path, step: int, trainer_state: dict[str, Any], config_yaml: str,
             keep: int, layout_free: dict[str, Any] | None = None) -> Path:
        """Write a complete checkpoint of `step` (collective: every rank calls it): the engine's own files, and
        with `layout_free` (the index header) also the layout-free form."""

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Restore model, optimizer and RNG from `checkpoint`'s own files (written by this layout); return the
        trainer state saved with it."""

    def load_layout_free(self, checkpoint: Path) -> dict[str, Any]:
        """Restore model and optimizer from `checkpoint`'s layout-free form (written by any layout); return its
        index header."""

    def init_weights(self, reader: Any) -> None:
        """Set the weights (not the optimizer state) from a reader of the unsplit tensors (`model.init_from`)."""

    def memory_report(self, run_dir: Path | None = None) -> str | None:
        """Measured bytes of parameters, gradients and optimizer state next to the ZeRO formula."""
