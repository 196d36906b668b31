"""Where a run stands (saved with every checkpoint), and how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bigtrain.checkpoint.joined_qkv import QKV_LAYOUT


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs (the data position is `step`)."""

    step: int = 0
    tokens: int = 0
    best_eval_loss: float = float("inf")
    evals_without_improvement: int = 0
    tokenizer: str = ""  # the tokenizer's name: ids mean the same text only with the same tokenizer
    skipped_in_a_row: int = 0  # train.on_nonfinite=skip: consecutive skipped steps
    source_tokens: dict[str, int] = field(default_factory=dict)  # data.sources: input tokens trained per source
    qkv_layout: str = QKV_LAYOUT  # how attention holds Q, K, V (checkpoints without it hold three parameters)
    fp8_fallback: list[str] = field(default_factory=list)  # train.precision=fp8: blocks fallen back to bf16
    fp8_strikes: dict[str, int] = field(default_factory=dict)  # fp8: each block's failed guard checks in a row

    def add_source_tokens(self, tokens: dict[str, int]) -> None:
        for name, n in tokens.items():
            self.source_tokens[name] = self.source_tokens.get(name, 0) + n


@dataclass
class TrainResult:
    state: TrainState
    last_eval: dict[str, float] | None
    run_dir: Path
    stopped_early: bool = False
    stopped_by: int = 0  # the signal (SIGUSR1 / SIGTERM) that stopped the run before train.steps, after a save
