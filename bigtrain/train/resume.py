"""Choosing and checking the checkpoint a run resumes from.

1. Which checkpoint: rank 0 verifies the one `latest` names against its manifest and falls back to older
   intact ones (`components/integrity.py`); the choice, its notes, or the error reach every rank in one
   broadcast, so all ranks resume the same step or all stop with the same message.
2. Does it fit this run: the layout must be the one that wrote it; the saved config is compared key by key
   with this run's (`config/compare.py`): changes that alter what the state means are refused unless allowed
   with `--allow-changes`, others pass with a note; a tokenizer whose ids mean something else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bigtrain.components import checkpoint as ckpt
from bigtrain.components.integrity import ResumeChoice, choose_checkpoint
from bigtrain.config import Config
from bigtrain.config.compare import Change, check_resume, config_changes
from bigtrain.config.layout import Layout
from bigtrain.distributed.agree import on_main
from bigtrain.errors import CheckpointError

# The layout is compared as a whole (Layout + sequence_parallel) before the key-by-key comparison.
_LAYOUT_KEYS = ("parallel.tensor", "parallel.pipeline", "parallel.data", "parallel.sequence_parallel")


def agreed_choice(directory: Path, is_main: bool, distributed: bool) -> ResumeChoice:
    """The checkpoint to resume from, chosen on rank 0 and the same on every rank (None: start fresh)."""
    choice = on_main(is_main, distributed, lambda: choose_checkpoint(directory))
    assert choice is not None
    return choice


@dataclass
class ResumeCheck:
    accepted: list[Change] = field(default_factory=list)  # meaningful changes the user allowed
    harmless: list[Change] = field(default_factory=list)


def check_fits(checkpoint: Path, cfg: Config, layout: Layout, world_size: int, allowed: set[str]) -> ResumeCheck:
    """Raise CheckpointError unless `checkpoint` can be resumed by this run (see the module docstring)."""
    saved_cfg, saved_world = ckpt.saved_config(checkpoint)
    saved, now = saved_cfg.parallel, cfg.parallel
    saved_layout = Layout.for_world(saved.tensor, saved.pipeline, saved_world)
    if (saved_layout, saved.sequence_parallel) != (layout, now.sequence_parallel):
        raise CheckpointError(
            f"run.dir {cfg.run.dir} holds a checkpoint written with parallel.tensor={saved.tensor}, "
            f"pipeline={saved.pipeline}, sequence_parallel={saved.sequence_parallel} on {saved_world} rank(s) "
            f"({saved_layout.describe()}), but this run uses tensor={now.tensor}, pipeline={now.pipeline}, "
            f"sequence_parallel={now.sequence_parallel} on {world_size} ({layout.describe()}). Resume with the "
            f"layout that wrote it (`bigtrain consolidate` turns it into single-device weights), or use a new "
            f"run.dir.")
    changes = [c for c in config_changes(saved_cfg, cfg) if c.key not in _LAYOUT_KEYS]
    accepted, harmless = check_resume(changes, allowed, f"run.dir {cfg.run.dir}")
    return ResumeCheck(accepted, harmless)


def check_tokenizer(checkpoint: Path, tokenizer_name: str, allowed: set[str]) -> None:
    """The tokenizer must be the one that wrote the checkpoint (same ids for the same text)."""
    saved = ckpt.saved_trainer_state(checkpoint).get("tokenizer", "")
    if saved and saved != tokenizer_name and "data.tokenizer" not in allowed and "data." not in allowed:
        raise CheckpointError(
            f"{checkpoint} was written with the tokenizer {saved!r}, but this run's is {tokenizer_name!r}: token "
            f"ids would mean other text. Restore the tokenizer file the run used, use a new run.dir, or accept it "
            f"with --allow-changes data.tokenizer.")
