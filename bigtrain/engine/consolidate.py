"""Turn a checkpoint of any engine into one full set of fp32 weights that single-device bigtrain loads.

ZeRO-1/2/3 checkpoints hold the fp32 master weights in per-rank partitions; DeepSpeed's `zero_to_fp32`
reassembles them. ZeRO-0 and single-process checkpoints already hold the whole model. The result is
`model.pt` (a plain state dict, loadable with `weights_only=True`) and the run's `config.yaml`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from bigtrain.errors import CheckpointError
from bigtrain.train import checkpoint as ckpt

DS_MODEL_STATES = "mp_rank_00_model_states.pt"


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    directory = run_dir / "checkpoints"
    if step is None:
        path = ckpt.latest_checkpoint(directory)
        if path is None:
            raise CheckpointError(f"{directory} holds no checkpoint (no 'latest' pointer). Train first, or pass "
                                  f"the run.dir of a run that saved one.")
        return path
    path = directory / ckpt.step_dir_name(step)
    if not path.is_dir():
        steps = ", ".join(p.name for p in sorted(directory.glob("step_*"))) or "none"
        raise CheckpointError(f"No checkpoint for step {step} in {directory}; available: {steps}.")
    return path


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    if (checkpoint / "model.pt").exists():  # single-process engine
        state = ckpt.load_part(checkpoint, "model")
    elif list(checkpoint.glob("*model_states.pt")):  # DeepSpeed (ZeRO-3 names its files per rank)
        stage = yaml.safe_load((checkpoint / "config.yaml").read_text())["parallel"]["zero_stage"]
        if stage == 0:
            # bigtrain's own checkpoint (DeepSpeed pickles its module state): trusted like any run.dir file.
            state = torch.load(checkpoint / DS_MODEL_STATES, map_location="cpu", weights_only=False)["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        raise CheckpointError(f"{checkpoint} is neither a bigtrain single-process checkpoint (model.pt) nor a "
                              f"DeepSpeed one (*model_states.pt).")
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def consolidate(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write `<out>/model.pt` and `<out>/config.yaml`; default out: run_dir/consolidated/step_N."""
    checkpoint = find_checkpoint(run_dir, step)
    out = out or run_dir / "consolidated" / checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    torch.save(consolidated_state_dict(checkpoint), out / "model.pt")
    shutil.copyfile(checkpoint / "config.yaml", out / "config.yaml")
    return out
