"""Whether a saved checkpoint may be resumed by this run, and what to say about it.

1. Does it fit this run: the saved config is compared key by key with this run's (`compare.py`): changes that
   alter what the state means are refused unless allowed with `--allow-changes`, others pass with a note; a
   tokenizer whose ids mean something else is refused. The layout may differ.
2. A changed global batch size is allowed, with a warning saying what it does to the data order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigtrain.checkpoint.compare import Change, check_resume, config_changes
from bigtrain.checkpoint.saved import SavedCheckpoint
from bigtrain.config import Config
from bigtrain.errors import CheckpointError


@dataclass
class ResumeCheck:
    accepted: list[Change] = field(default_factory=list)  # meaningful changes the user allowed
    harmless: list[Change] = field(default_factory=list)


def check_fits(saved: SavedCheckpoint, cfg: Config, allowed: set[str]) -> ResumeCheck:
    """Raise CheckpointError unless `saved`'s config may be resumed by this run's (see the module docstring); the
    layout is free to differ."""
    changes = [c for c in config_changes(saved.config, cfg) if not c.key.startswith("parallel.")]
    accepted, harmless = check_resume(changes, allowed, f"run.dir {cfg.run.dir}")
    return ResumeCheck(accepted, harmless)


def check_tokenizer(saved: SavedCheckpoint, tokenizer_name: str, allowed: set[str]) -> None:
    """The tokenizer must be the one that wrote the checkpoint (same ids for the same text)."""
    written = saved.trainer_state.get("tokenizer", "")
    if written and written != tokenizer_name and "data.tokenizer" not in allowed and "data." not in allowed:
        raise CheckpointError(
            f"{saved.path} was written with the tokenizer {written!r}, but this run's is {tokenizer_name!r}: token "
            f"ids would mean other text. Restore the tokenizer file the run used, use a new run.dir, or accept it "
            f"with --allow-changes data.tokenizer.")


def batch_change_notes(saved: SavedCheckpoint, cfg: Config) -> list[str]:
    """What a changed global batch size does to a resumed run (allowed, but not what one usually wants)."""
    before, now = saved.config.train.global_batch_size, cfg.train.global_batch_size
    if before == now:
        return []
    step = saved.step
    return [f"warning: train.global_batch_size changed from {before} to {now}. The run goes on at step {step + 1}, "
            f"whose global batch starts at sample {step * now} of the data order instead of {step * before} (some "
            f"samples of this epoch are skipped or seen twice), each step now averages {now} sequences, and the "
            f"learning-rate schedule keeps counting steps. Keep {before} to continue the same run."]
