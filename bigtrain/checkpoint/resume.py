"""Choosing and checking the checkpoint a run resumes from.

1. Which checkpoint: rank 0 verifies the one `latest` names against its manifest and falls back to older
   intact ones (`components/integrity.py`); the choice, its notes, or the error reach every rank in one
   broadcast, so all ranks resume the same step or all stop with the same message.
2. Does it fit this run: the saved config is compared key by key with this run's (`config/compare.py`):
   changes that alter what the state means are refused unless allowed with `--allow-changes`, others pass with
   a note; a tokenizer whose ids mean something else is refused. The layout may differ.
3. How to load it: with the layout that wrote it, from the engine's own files (exact, RNG included); under any
   other layout (tensor, pipeline, data size, ZeRO stage, engine, precision), from its layout-free form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.compare import Change, check_resume, config_changes
from bigtrain.checkpoint.integrity import ResumeChoice, choose_checkpoint
from bigtrain.checkpoint.layout_free import FOLDER, INDEX
from bigtrain.config import Config, config_to_dict
from bigtrain.config.layout import Layout, resolve_layout
from bigtrain.distributed.agree import on_main
from bigtrain.errors import CheckpointError


def agreed_choice(directory: Path, is_main: bool, distributed: bool) -> ResumeChoice:
    """The checkpoint to resume from, chosen on rank 0 and the same on every rank (None: start fresh)."""
    choice = on_main(is_main, distributed, lambda: choose_checkpoint(directory))
    assert choice is not None
    return choice


@dataclass
class ResumeCheck:
    accepted: list[Change] = field(default_factory=list)  # meaningful changes the user allowed
    harmless: list[Change] = field(default_factory=list)


def check_fits(checkpoint: Path, cfg: Config, world_size: int, allowed: set[str]) -> ResumeCheck:
    """Raise CheckpointError unless `checkpoint`'s config may be resumed by this run's (see the module
    docstring); the layout is free to differ."""
    saved_cfg, _ = ckpt.saved_config(checkpoint)
    changes = [c for c in config_changes(saved_cfg, cfg) if not c.key.startswith("parallel.")]
    accepted, harmless = check_resume(changes, allowed, f"run.dir {cfg.run.dir}")
    return ResumeCheck(accepted, harmless)


# ---- layouts ------------------------------------------------------------------------------------------------
def layout_of(cfg: Config, world_size: int) -> dict[str, Any]:
    """What decides whether a checkpoint's own (native) files fit a run: the split, the engine, the precision."""
    p = cfg.parallel
    layout = Layout.for_world(p.tensor, p.pipeline, world_size, p.data)
    engine = ("fairscale" if p.engine == "fairscale" else "pipeline" if p.pipeline > 1
              else "deepspeed" if resolve_layout(cfg, world_size).deepspeed else "torch")
    return {"tensor": layout.tensor, "pipeline": layout.pipeline, "data": layout.data,
            "sequence_parallel": p.sequence_parallel, "zero_stage": p.zero_stage if engine != "torch" else 0,
            "engine": engine, "precision": cfg.train.precision}


def written_layout(checkpoint: Path) -> dict[str, Any]:
    saved_cfg, saved_world = ckpt.saved_config(checkpoint)
    return layout_of(saved_cfg, saved_world)


def describe(layout: dict[str, Any]) -> str:
    engine = {"torch": "the plain PyTorch engine", "deepspeed": "DeepSpeed",
              "pipeline": "DeepSpeed's pipeline engine", "fairscale": "fairscale"}
    sp = " + sequence parallel" if layout["sequence_parallel"] else ""
    zero = f", ZeRO-{layout['zero_stage']}" if layout["engine"] != "torch" else ""
    return (f"tensor {layout['tensor']}{sp} × pipeline {layout['pipeline']} × data {layout['data']}{zero}, "
            f"{engine[layout['engine']]}, {layout['precision']}")


def native_files_present(checkpoint: Path) -> bool:
    return (checkpoint / "model.pt").exists() or (checkpoint / "trainer_rank00000.pt").exists()


def has_layout_free(checkpoint: Path) -> bool:
    return (checkpoint / FOLDER / INDEX).exists()


def layout_free_header(cfg: Config, full_model: nn.Module, trainer_state: dict[str, Any],
                       world_size: int) -> dict[str, Any]:
    """The index header of a layout-free form: what it holds and where training stands."""
    return {"step": trainer_state["step"],
            "parameters": {name: {"shape": list(p.shape)} for name, p in full_model.named_parameters()},
            "model": config_to_dict(cfg)["model"], "optimizer": {"name": cfg.optim.name},
            "trainer": trainer_state, "written_by": layout_of(cfg, world_size),
            "data": {"seed": cfg.train.seed, "global_batch_size": cfg.train.global_batch_size,
                     "samples_seen": trainer_state["step"] * cfg.train.global_batch_size}}


def batch_change_notes(checkpoint: Path, cfg: Config) -> list[str]:
    """What a changed global batch size does to a resumed run (allowed, but not what one usually wants)."""
    saved_cfg, _ = ckpt.saved_config(checkpoint)
    before, now = saved_cfg.train.global_batch_size, cfg.train.global_batch_size
    if before == now:
        return []
    step = ckpt.saved_trainer_state(checkpoint).get("step", 0)
    return [f"warning: train.global_batch_size changed from {before} to {now}. The run goes on at step {step + 1}, "
            f"whose global batch starts at sample {step * now} of the data order instead of {step * before} (some "
            f"samples of this epoch are skipped or seen twice), each step now averages {now} sequences, and the "
            f"learning-rate schedule keeps counting steps. Keep {before} to continue the same run."]


def check_tokenizer(checkpoint: Path, tokenizer_name: str, allowed: set[str]) -> None:
    """The tokenizer must be the one that wrote the checkpoint (same ids for the same text)."""
    saved = ckpt.saved_trainer_state(checkpoint).get("tokenizer", "")
    if saved and saved != tokenizer_name and "data.tokenizer" not in allowed and "data." not in allowed:
        raise CheckpointError(
            f"{checkpoint} was written with the tokenizer {saved!r}, but this run's is {tokenizer_name!r}: token "
            f"ids would mean other text. Restore the tokenizer file the run used, use a new run.dir, or accept it "
            f"with --allow-changes data.tokenizer.")
