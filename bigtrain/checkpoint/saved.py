"""A saved checkpoint, read once: the config and the layout that wrote it, where training stood, which forms it
holds; and the one way from what a user points at (a run.dir, a checkpoint folder) to a checkpoint.

    config.yaml                  the config of the run that wrote it
    manifest.json "layout"       the layout that wrote it (`Layout.record`); older checkpoints lack it, and it is
                                 derived from their config and the number of per-rank trainer files
    trainer_rankNNNNN.pt         each rank's trainer state and RNG (the plain engine once wrote `trainer.pt`)
    layout_free/index.json       the layout-free form, when the save wrote it

Nothing here guesses an engine from file names: the recorded layout says which engine wrote the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bigtrain.checkpoint.integrity import STEP_DIR, read_latest, read_manifest, step_dirs, step_of, verify
from bigtrain.checkpoint.layout_free import FOLDER, INDEX
from bigtrain.checkpoint.store import step_dir_name
from bigtrain.config import Config
from bigtrain.config.layout import Layout, resolve_layout
from bigtrain.config.loader import config_from_dict
from bigtrain.errors import BigtrainError, CheckpointError, UsageError
from bigtrain.io import load_torch

LEGACY_TRAINER = "trainer.pt"  # the plain engine's trainer file before one save sequence wrote every engine's


def trainer_file(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    config: Config  # the config that wrote it (one-device checks: its own layout is `layout`)
    layout: Layout  # the layout that wrote it
    trainer_state: dict[str, Any]  # where training stood (step, tokens, ...), as rank 0 saved it

    @property
    def step(self) -> int:
        return int(self.trainer_state.get("step", 0))

    @property
    def has_layout_free(self) -> bool:
        return (self.path / FOLDER / INDEX).exists()

    @property
    def has_native(self) -> bool:
        """Whether the engine's own files (with every rank's trainer state and RNG) are there."""
        return (self.path / trainer_file(0)).exists() or (self.path / LEGACY_TRAINER).exists()

    @classmethod
    def read(cls, path: Path) -> SavedCheckpoint:
        """Read `path`'s config, layout and trainer state (a damaged file is a CheckpointError naming it)."""
        recorded = (read_manifest(path) or {}).get("layout")
        if isinstance(recorded, dict):
            layout = Layout.from_record(recorded)
            config = _saved_config(path, layout.world_size)
        else:  # written before the manifest recorded it: one trainer file per rank, and the config
            config = _saved_config(path, _ranks_that_wrote(path))
            layout = resolve_layout(config, _ranks_that_wrote(path))
        state = _trainer_record(path, 0).get("state")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds no trainer state; the checkpoint is damaged or was not written by "
                                  f"bigtrain.")
        return cls(path, config, layout, state)

    def trainer_record(self, rank: int) -> dict[str, Any]:
        """Rank `rank`'s trainer file: {"state", "rng", ...}."""
        return _trainer_record(self.path, rank)


def _trainer_record(path: Path, rank: int) -> dict[str, Any]:
    name = trainer_file(rank)
    if rank == 0 and not (path / name).exists() and (path / LEGACY_TRAINER).exists():
        name = LEGACY_TRAINER
    record = load_torch(path / name)
    if not isinstance(record, dict):
        raise CheckpointError(f"{path / name} holds no trainer record; the checkpoint is damaged or was not "
                              f"written by bigtrain.")
    return record


def _ranks_that_wrote(checkpoint: Path) -> int:
    """How many ranks wrote a checkpoint: one trainer file each."""
    return max(1, len(list(checkpoint.glob("trainer_rank*.pt"))))


def _saved_config(checkpoint: Path, world: int) -> Config:
    path = checkpoint / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a mapping of sections")
        return config_from_dict(raw, world_size=world)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, BigtrainError) as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"{path} cannot be read as the config of that checkpoint ({type(exc).__name__}: "
                              f"{reason[:300]}). The checkpoint is damaged: remove {checkpoint} (or point "
                              f"{checkpoint.parent / 'latest'} at an older step), or use a new run.dir.") from None


def find_checkpoint(path: Path, step: int | None = None, pick: str = "--step") -> Path:
    """The checkpoint `path` means: a checkpoint folder itself, or in a run.dir the checkpoint of `step` (default:
    the one `latest` names, else the newest), verified against its manifest; nothing on disk is changed
    (resuming moves damaged checkpoints aside, reading does not). A damaged or missing one is a CheckpointError
    that lists the run's intact checkpoints as the user picks them: `pick` is "--step" (a command's option: --step N
    in a run.dir, else the folder's path) or the config key that names a checkpoint folder ("model.init_from")."""
    directory = path / "checkpoints"
    if not directory.is_dir():
        if not (path / "config.yaml").exists():
            raise CheckpointError(f"{path} holds no checkpoint: it is neither a run.dir (with checkpoints/) nor a "
                                  f"checkpoint folder (step_N with a config.yaml). Train first, or pass the run.dir of "
                                  f"a run that saved one.")
        if step is not None and not (STEP_DIR.match(path.name) and step_of(path) == step):
            raise UsageError(f"--step {step}: {path} is one checkpoint folder, not a run.dir; leave --step out, or "
                             f"pass the run.dir (the folder holding checkpoints/) with --step {step}.")
        checkpoint = path
        siblings = step_dirs(path.parent) if STEP_DIR.match(path.name) else []
        how = (lambda c: str(c)) if pick == "--step" else (lambda c: f"{pick}={c}")
    else:
        siblings = step_dirs(directory)
        how = (lambda c: f"--step {step_of(c)}") if pick == "--step" else (lambda c: f"{pick}={c}")
        if step is None:
            checkpoint, problem = read_latest(directory)
            if checkpoint is None and siblings:
                checkpoint = siblings[-1]
            if checkpoint is None:
                raise CheckpointError(f"{directory} holds no checkpoint{f' ({problem})' if problem else ''}. Train "
                                      f"first, or pass the run.dir of a run that saved one.")
        else:
            checkpoint = directory / step_dir_name(step)
            if not checkpoint.is_dir():
                raise CheckpointError(f"No checkpoint for step {step} in {directory}. "
                                      f"{_intact_ones(siblings, None, how)}")
    reason = verify(checkpoint)
    if reason is not None:
        advice = _intact_ones(siblings, checkpoint, how)
        raise CheckpointError(f"Checkpoint {checkpoint} is damaged: {reason}. {advice}")
    return checkpoint


def _intact_ones(checkpoints: list[Path], damaged: Path | None, how: Callable[[Path], str]) -> str:
    """The advice that lists the intact checkpoints among `checkpoints` (newest first; each verified against its
    manifest, so a damaged one is never offered), as the user picks them (`how`)."""
    intact = [how(c) for c in reversed(checkpoints) if c != damaged and verify(c) is None]
    if not intact:
        return "No other checkpoint of the run is intact: train again, or use a new run.dir."
    return f"Pick an intact one: {', '.join(intact)}."
