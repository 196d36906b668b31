"""What the rest of bigtrain needs from an engine, and what an engine tells about where its state lives.

Every engine runs the one step skeleton (`bigtrain.engine.step.StepEngine`) and answers the same calls, so the
trainer, the checkpoint manager and the commands never ask which engine they hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from bigtrain.compat.deepspeed import local_shape
from bigtrain.config.layout import Layout
from bigtrain.engine.evaluate import EvalSums
from bigtrain.engine.result import StepResult
from bigtrain.models.init import Shard


@dataclass
class ShardedState:
    """Where this rank's share of the model and optimizer state lives, for the layout-free form
    (`bigtrain.checkpoint.state.StateAdapter` reads and writes it).

    optimizer: the torch optimizer bigtrain built (inside DeepSpeed's wrapper where there is one); wrapper:
    DeepSpeed's ZeRO / bf16 optimizer, or None. An engine that shards optimizer state by owner (fairscale's OSS)
    gives `state_owner`; one that partitions parameters itself (fairscale's FSDP, FSDP2) gives `partition` (this
    rank's part of a parameter), `params` (the parameters under their unwrapped names; FSDP2: this rank's values
    of each, flat) and `shape_of` (a parameter's shape before partitioning)."""

    model: nn.Module
    shards: dict[str, Shard]
    optimizer: torch.optim.Optimizer
    wrapper: object | None = None
    tensor_rank: int = 0
    data_rank: int = 0
    state_owner: Callable[[torch.Tensor], bool] | None = None
    partition: Callable[[torch.Tensor], Any] | None = None
    params: list[tuple[str, nn.Parameter]] | None = field(default=None)
    shape_of: Callable[[torch.Tensor], torch.Size] = local_shape
    state_writer: Callable[[torch.Tensor], bool] | None = None  # who writes a per-parameter state (default: data
    # rank 0; under expert parallelism a routed expert's by the first rank of its expert-data group)


class Engine(Protocol):
    layout: Layout
    model: nn.Module  # the model as the engine runs it (evaluation and sampling go through it)
    dp_rank: int
    dp_size: int
    config_file: str | None  # the run.dir file `describe()` goes to; None: nothing to write
    native_state: bool  # whether `write_native` holds the model and optimizer state (else the layout-free form does)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float, layer_norms: bool = False,
                   counts: tuple[int, int] | None = None) -> StepResult:
        """Forward/backward this rank's micro-batches of the global batch and apply one update at `lr`."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision region the engine runs forward passes in."""

    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Held-out metrics over `batches` (every rank evaluates all of them and returns the same numbers)."""

    def evaluate_sums(self, batches: list[dict[str, torch.Tensor]]) -> EvalSums:
        """The summed loss and counts behind `evaluate` (what adds up across a mixture's sources)."""

    def describe(self) -> str:
        """The engine's settings as JSON (DeepSpeed's derived config, fairscale's sharding)."""

    def memory_report(self, run_dir: Path | None = None) -> str | None:
        """Measured bytes of parameters, gradients and optimizer state next to the ZeRO formula (collective);
        the text on rank 0, None elsewhere or where the engine has none."""

    def sharded_state(self) -> ShardedState:
        """Where this rank's model and optimizer state live (the layout-free form is read from and written to
        it; `model.init_from` restores weights through it)."""

    def write_native(self, folder: Path) -> None:
        """Write this rank's own checkpoint files (the engine's native form) into `folder` (collective)."""

    def read_native(self, checkpoint: Path) -> None:
        """Restore model and optimizer from the native files a run of the same layout wrote into `checkpoint`."""
