"""Turn a checkpoint of any engine into one full set of fp32 weights that single-device bigtrain loads.

ZeRO-1/2/3 checkpoints hold the fp32 master weights in per-rank partitions; DeepSpeed's `zero_to_fp32`
reassembles them. ZeRO-0 and single-process checkpoints already hold the whole model. Under tensor
parallelism every tensor rank r has its own files (`*mp_rank_{r:02d}*`): each is reassembled on its own,
then the shards are concatenated along the dimension the split cut (`shard_plan`). Pipeline checkpoints
hold one file per layer (and tensor rank), whose keys are already the unsplit model's parameter names. The result is
`model.pt` (a plain state dict, loadable with `weights_only=True`) and the run's `config.yaml`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import yaml

from bigtrain.compat.deepspeed import (
    fp32_state_dict_from_zero,
    model_states_file,
    pipeline_layer_files,
    tensor_rank_files,
)
from bigtrain.components import checkpoint as ckpt
from bigtrain.config import ModelConfig, dump_config
from bigtrain.config.loader import config_from_dict
from bigtrain.errors import CheckpointError


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


def _deepspeed_state(checkpoint: Path, stage: int, tensor_rank: int) -> dict[str, torch.Tensor]:
    """The whole (unsplit by ZeRO) state of one tensor rank's files in a DeepSpeed checkpoint."""
    if stage == 0:
        # bigtrain's own checkpoint (DeepSpeed pickles its module state): trusted like any run.dir file.
        path = checkpoint / model_states_file(tensor_rank)
        return torch.load(path, map_location="cpu", weights_only=False)["module"]
    # zero_to_fp32 reads every *_model_states.pt / *_optim_states.pt of a tag: give it this rank's only.
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / checkpoint.name
        view.mkdir()
        for f in checkpoint.glob(tensor_rank_files(tensor_rank)):
            (view / f.name).symlink_to(f.resolve())
        return fp32_state_dict_from_zero(Path(tmp), tag=checkpoint.name)


def _pipeline_state(checkpoint: Path, tensor: int, tensor_rank: int) -> dict[str, torch.Tensor]:
    """Union of one tensor rank's pipeline layer files: the layers use the unsplit model's parameter names."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint.glob(pipeline_layer_files(tensor, tensor_rank))):
        # bigtrain's own checkpoint, written by DeepSpeed with pickle: trusted like any run.dir file.
        state.update(torch.load(path, map_location="cpu", weights_only=False))
    return state


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    if (checkpoint / "model.pt").exists():  # single-process engine
        state = ckpt.load_part(checkpoint, "model")
    elif list(checkpoint.glob("*model_states.pt")):  # DeepSpeed (ZeRO-3 names its files per rank)
        cfg = config_from_dict(yaml.safe_load((checkpoint / "config.yaml").read_text()),
                               world_size=ckpt.ranks_that_wrote(checkpoint))
        tensor = cfg.parallel.tensor
        if cfg.parallel.pipeline > 1:
            # Layer files hold the module weights: exactly the trained weights in fp32; under bf16/fp16 the
            # 16-bit copies (DeepSpeed keeps the fp32 masters in its optimizer partitions).
            shards = [_pipeline_state(checkpoint, tensor, r) for r in range(tensor)]
        else:
            shards = [_deepspeed_state(checkpoint, cfg.parallel.zero_stage, r) for r in range(tensor)]
        if cfg.model.tie_embeddings:
            # zero_to_fp32 restores tied names only where DeepSpeed recorded the sharing (not on every rank).
            for s in shards:
                s.setdefault("head.weight", s["embed.tokens.weight"])
        state = merge_tensor_shards(shards, cfg.model) if tensor > 1 else shards[0]
    else:
        raise CheckpointError(f"{checkpoint} is neither a bigtrain single-process checkpoint (model.pt) nor a "
                              f"DeepSpeed one (*model_states.pt).")
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def merge_tensor_shards(shards: list[dict[str, torch.Tensor]], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One state dict from the tensor ranks' state dicts: split parameters concatenated along their dim."""
    from bigtrain.parallel.tensor import shard_plan

    vocab = shards[0]["embed.tokens.weight"].shape[0] * len(shards)
    plan = shard_plan(model_cfg, vocab, len(shards))
    return {name: torch.cat([s[name] for s in shards], dim=plan[name].dim) if name in plan else value
            for name, value in shards[0].items()}


def consolidate(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write `<out>/model.pt` and `<out>/config.yaml`; default out: run_dir/consolidated/step_N.

    The config is the run's with a one-device layout (tensor = pipeline = 1), as the weights now are."""
    checkpoint = find_checkpoint(run_dir, step)
    out = out or run_dir / "consolidated" / checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    torch.save(consolidated_state_dict(checkpoint), out / "model.pt")
    raw = yaml.safe_load((checkpoint / "config.yaml").read_text())
    raw.setdefault("parallel", {}).update(tensor=1, pipeline=1, data=None, sequence_parallel=False)
    (out / "config.yaml").write_text(dump_config(config_from_dict(raw)))
    return out
