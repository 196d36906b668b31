"""What the trainer needs from an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from bigtrain.components.step_result import StepResult
from bigtrain.models import TransformerLM


class Engine(Protocol):
    model: TransformerLM  # the module to run for evaluation and sampling (the pipeline engine, whose
    # module is one stage, evaluates through its own `evaluate(batches)` instead)
    rank: int
    dp_rank: int
    dp_size: int

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool
                   ) -> StepResult:
        """Forward/backward this rank's micro-batches of the global batch and apply one update at `lr`."""

    def save(self, directory: Path, step: int, trainer_state: dict[str, Any], config_yaml: str,
             keep: int) -> Path:
        """Write a complete checkpoint of `step` (collective: every rank calls it)."""

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Restore model, optimizer and RNG from `checkpoint`; return the trainer state saved with it."""

    def memory_report(self, run_dir: Path | None = None) -> str | None:
        """Measured bytes of parameters, gradients and optimizer state next to the ZeRO formula."""
