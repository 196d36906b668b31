"""`CheckpointManager`: every checkpoint of a run, as the training loop sees it.

    due(step, final)   a checkpoint every checkpoint.every steps, and at the end (or an early stop, or a signal)
    save(state, last)  the one save sequence (`save.py`) with the layout-free form every
                       checkpoint.layout_free_every-th save and always at the last one (null: every save while the
                       form is at most LAYOUT_FREE_AUTO_BYTES, else the last one only: a 175B model's form is 2.1
                       TB, which every save would write again next to the engine's own files); at every save
                       when the engine's own files do not hold its state (`native_state`: expert parallelism)
    restore(...)       the checkpoint to resume from and the state it holds:
                         1. which: rank 0 verifies the one `latest` names against its manifest and falls back to
                            older intact ones (`integrity.py`); the choice, its notes or the error reach every rank
                            in one broadcast, so all ranks resume the same step or all stop with the same message
                         2. does it fit this run (`resume.py`): config and tokenizer; the layout may differ
                         3. how: written by this very layout (`SavedCheckpoint.layout`), from the engine's own
                            files (or its layout-free form when those hold no state), exact with every RNG;
                            under any other layout from the layout-free form, with
                            dropout streams going on from (seed, replica, step)
    load_weights(r)    weights (not the optimizer state) from a reader of unsplit tensors (`model.init_from`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain.checkpoint.integrity import choose_checkpoint
from bigtrain.checkpoint.joined_qkv import written_with_separate_qkv
from bigtrain.checkpoint.resume import ResumeCheck, batch_change_notes, check_fits, check_tokenizer
from bigtrain.checkpoint.save import restore_layout_free, save_checkpoint
from bigtrain.checkpoint.saved import SavedCheckpoint
from bigtrain.checkpoint.state import StateAdapter
from bigtrain.checkpoint.store import set_rng_state, step_dir_name
from bigtrain.config import Config, config_to_dict, dump_config
from bigtrain.config.layout import Layout
from bigtrain.distributed.agree import on_main
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.base import Engine
from bigtrain.errors import CheckpointError

LAYOUT_FREE_BYTES_PER_PARAMETER = 12  # the fp32 weight and two fp32 optimizer moments
LAYOUT_FREE_AUTO_BYTES = 16 * 2**30  # checkpoint.layout_free_every=null: every save up to this size, then the last


@dataclass
class Restored:
    """What a resume found: the checkpoint (None: start fresh), the trainer state it holds, how its config
    compares with this run's, and notes for the user."""

    path: Path | None = None
    trainer_state: dict[str, Any] | None = None
    check: ResumeCheck = field(default_factory=ResumeCheck)
    notes: list[str] = field(default_factory=list)


def layout_free_header(cfg: Config, layout: Layout, full_model: nn.Module, trainer_state: dict[str, Any]
                       ) -> dict[str, Any]:
    """The index header of a layout-free form: what it holds, where training stands, the layout that wrote it."""
    return {"step": trainer_state["step"],
            "parameters": {name: {"shape": list(p.shape)} for name, p in full_model.named_parameters()},
            "model": config_to_dict(cfg)["model"], "optimizer": {"name": cfg.optim.name},
            "trainer": trainer_state, "written_by": layout.record(),
            "data": {"seed": cfg.train.seed, "global_batch_size": cfg.train.global_batch_size,
                     "samples_seen": trainer_state["step"] * cfg.train.global_batch_size}}


class CheckpointManager:
    def __init__(self, cfg: Config, layout: Layout, engine: Engine, groups: ParallelGroups | None, rank: int,
                 run_dir: Path, full_model: nn.Module) -> None:
        self.cfg, self.layout, self.engine, self.groups, self.rank = cfg, layout, engine, groups, rank
        self.directory = run_dir / "checkpoints"
        self.full_model = full_model  # the unsplit model on the meta device: the shapes the index records
        self.barrier = groups.host_barrier if groups is not None else (lambda: None)
        self.saves = 0
        self.layout_free_bytes = LAYOUT_FREE_BYTES_PER_PARAMETER * sum(p.numel() for p in full_model.parameters())
        every = cfg.checkpoint.layout_free_every
        if every is None:  # by size: every save while small, else only the last one (0 = never; None here = last)
            every = 1 if self.layout_free_bytes <= LAYOUT_FREE_AUTO_BYTES else None
        self.layout_free_every = every

    def describe_cost(self) -> str:
        """What the layout-free form costs on disk and how often it is written (printed at the start)."""
        every = self.layout_free_every
        when = ("never (checkpoint.layout_free_every=0): a resume under another layout first needs `bigtrain "
                "convert`" if every == 0 else "with the last checkpoint of the run (the end, an early stop, a signal) "
                "only" if every is None else "with every checkpoint" if every == 1 else
                f"with every {every}th checkpoint and the last one")
        return (f"checkpoints: the layout-free form (resumable under any layout) adds "
                f"{self.layout_free_bytes / 2**30:.3g} GiB, about as much as the engine's own files, {when}; "
                f"checkpoint.layout_free_every sets it (docs/checkpoints.md)")

    def path_of(self, step: int) -> Path:
        return self.directory / step_dir_name(step)

    # ---- saving --------------------------------------------------------------------------------------
    def due(self, step: int, final: bool) -> bool:
        every = self.cfg.checkpoint.every
        return final or bool(every and step % every == 0)

    def save(self, trainer_state: dict[str, Any], last: bool) -> Path:
        """The checkpoint of `trainer_state["step"]` (collective)."""
        every = self.layout_free_every
        self.saves += 1
        header = None
        own_files_hold_state = self.engine is None or self.engine.native_state
        if not own_files_hold_state or (every != 0 and (last or (every is not None and self.saves % every == 0))):
            header = layout_free_header(self.cfg, self.layout, self.full_model, trainer_state)
        return save_checkpoint(self.directory, trainer_state["step"], self.engine, self.layout, self.rank,
                               self.barrier, trainer_state, dump_config(self.cfg), self.cfg.checkpoint.keep, header)

    # ---- restoring -----------------------------------------------------------------------------------
    def restore(self, tokenizer_name: str, allow_changes: set[str]) -> Restored:
        """Restore the engine from the checkpoint to resume from, if any (see the module docstring)."""
        choice = on_main(self.rank == 0, self.groups, lambda: choose_checkpoint(self.directory))
        assert choice is not None
        if choice.checkpoint is None:
            return Restored(notes=list(choice.notes))
        saved = SavedCheckpoint.read(choice.checkpoint)
        check = check_fits(saved, self.cfg, allow_changes)
        check_tokenizer(saved, tokenizer_name, allow_changes)
        notes = list(choice.notes)
        # Written while attention held Q, K, V as three parameters: the plain engine's files are read joined
        # (`bigtrain.engine.separate_qkv`), other engines' through the layout-free form (the optimizer's flat
        # partitions of DeepSpeed and fairscale depend on the parameters' shapes).
        separate = written_with_separate_qkv(saved.trainer_state)
        if saved.layout == self.layout and saved.has_native and (not separate or saved.layout.engine == "torch"):
            if self.engine.native_state:
                self.engine.read_native(saved.path)  # exact: the engine's own files, RNG included
            else:  # expert parallelism: the state is in the layout-free form alone, the RNG in the trainer files
                restore_layout_free(StateAdapter(self.engine.sharded_state()), saved.path)
            record = saved.trainer_record(self.rank)
            set_rng_state(record["rng"])
            state = record["state"]
        else:
            if separate and not saved.has_layout_free:
                raise CheckpointError(
                    f"{saved.path} was written by an earlier bigtrain, whose attention kept Q, K and V as three "
                    f"parameters, by {saved.layout.describe_run()} without a layout-free form; this bigtrain holds "
                    f"them as one (`qkv_proj`) and reads such a checkpoint of the {saved.layout.engine} engine only "
                    f"through that form. Give it the form with that bigtrain's `bigtrain convert` (then resume here), "
                    f"or resume it with that bigtrain.")
            if not saved.has_layout_free:
                raise CheckpointError(
                    f"{saved.path} was written by {saved.layout.describe_run()} and holds no layout-free form, so it "
                    f"can only be resumed by that layout (this run: {self.layout.describe_run()}). Resume with that "
                    f"layout, give it that form with `bigtrain convert`, or write checkpoints with "
                    f"checkpoint.layout_free_every=1.")
            state = restore_layout_free(StateAdapter(self.engine.sharded_state()), saved.path,
                                        saved.config.model if separate else None)["trainer"]
            # Dropout streams cannot carry across layouts: they go on from (seed, replica, step).
            offset = self.layout.seed_offset(self.rank)
            torch.manual_seed(self.cfg.train.seed + offset + 1_000_003 * state["step"])
            if saved.layout != self.layout:
                notes.append(f"resuming step {state['step']} written by {saved.layout.describe_run()} under "
                             f"{self.layout.describe_run()}")
        notes += batch_change_notes(saved, self.cfg)
        return Restored(saved.path, state, check, notes)

    def load_weights(self, reader: Any) -> None:
        """Set the weights from a reader of the unsplit tensors; the optimizer state stays fresh (step 0)."""
        StateAdapter(self.engine.sharded_state()).restore(reader, 0.0)
