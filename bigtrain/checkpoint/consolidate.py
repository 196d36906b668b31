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

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.integrity import read_latest, step_dirs, verify
from bigtrain.compat.deepspeed import (
    fp32_state_dict_from_zero,
    model_states_file,
    pipeline_layer_files,
    safe_checkpoint_loading,
    tensor_rank_files,
)
from bigtrain.config import ModelConfig, dump_config
from bigtrain.config.layout import Layout
from bigtrain.config.loader import config_from_dict
from bigtrain.errors import CheckpointError


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `step` (default: the one `latest` names, else the newest), verified against its
    manifest; nothing on disk is changed (resuming moves damaged checkpoints aside, reading does not)."""
    directory = run_dir / "checkpoints"
    available = ", ".join(p.name for p in step_dirs(directory)) or "none"
    if step is None:
        path, problem = read_latest(directory)
        if path is None and step_dirs(directory):
            path = step_dirs(directory)[-1]
        if path is None:
            raise CheckpointError(f"{directory} holds no checkpoint{f' ({problem})' if problem else ''}. Train "
                                  f"first, or pass the run.dir of a run that saved one.")
    else:
        path = directory / ckpt.step_dir_name(step)
        if not path.is_dir():
            raise CheckpointError(f"No checkpoint for step {step} in {directory}; available: {available}.")
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"Checkpoint {path} is damaged: {reason}. Pick another with --step (available: "
                              f"{available}).")
    return path


def _deepspeed_state(checkpoint: Path, stage: int, tensor_rank: int) -> dict[str, torch.Tensor]:
    """The whole (unsplit by ZeRO) state of one tensor rank's files in a DeepSpeed checkpoint."""
    if stage == 0:
        path = checkpoint / model_states_file(tensor_rank)
        return torch.load(path, map_location="cpu", weights_only=True)["module"]
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
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def _fairscale_state(checkpoint: Path, stage: int, layout: Layout, tensor_rank: int) -> dict[str, torch.Tensor]:
    """One tensor rank's whole state from the fairscale engine's files: data rank 0's model (OSS), or every data
    rank's flat shards put back together (FSDP)."""
    from bigtrain.engine.fairscale.fully_sharded import unshard

    parts = [ckpt.load_part(checkpoint, f"fairscale_rank{layout.rank_of(0, d, tensor_rank):05d}")
             for d in range(layout.data if stage == 3 else 1)]
    if stage != 3:
        return parts[0]["model"]
    shapes = parts[0]["shapes"]
    return {name: unshard([p["model"][name] for p in parts], shape) for name, shape in shapes.items()}


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """One full fp32 state dict from `checkpoint`; every file is read by the weights-only unpickler (DeepSpeed's
    zero_to_fp32 included), so no code stored in a file runs."""
    try:
        with safe_checkpoint_loading():
            return _consolidated_state_dict(checkpoint)
    except CheckpointError:
        raise
    except Exception as exc:  # a refused pickle, a truncated or foreign file
        reason = " ".join(str(exc).split())[:400]
        raise CheckpointError(f"Cannot read the checkpoint {checkpoint} ({type(exc).__name__}: {reason}). Its files "
                              f"are damaged, were not written by bigtrain, or hold objects that are not plain data "
                              f"(refused).") from None


def _consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    if (checkpoint / "model.pt").exists():  # single-process engine
        state = ckpt.load_part(checkpoint, "model")
    elif list(checkpoint.glob("*model_states.pt")):  # DeepSpeed (ZeRO-3 names its files per rank)
        cfg, _ = ckpt.saved_config(checkpoint)
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
    elif (checkpoint / "fairscale_rank00000.pt").exists():
        cfg, world = ckpt.saved_config(checkpoint)
        layout = Layout.for_world(cfg.parallel.tensor, 1, world)
        shards = [_fairscale_state(checkpoint, cfg.parallel.zero_stage, layout, r) for r in range(layout.tensor)]
        state = merge_tensor_shards(shards, cfg.model) if layout.tensor > 1 else shards[0]
    else:
        raise CheckpointError(f"{checkpoint} is neither a bigtrain single-process checkpoint (model.pt), a "
                              f"DeepSpeed one (*model_states.pt) nor a fairscale one (fairscale_rank*.pt).")
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def merge_tensor_shards(shards: list[dict[str, torch.Tensor]], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One state dict from the tensor ranks' state dicts: split parameters concatenated along their dim."""
    from bigtrain.parallel.tensor import shard_plan

    vocab = shards[0]["embed.tokens.weight"].shape[0] * len(shards)
    plan = shard_plan(model_cfg, vocab, len(shards))
    return {name: torch.cat([s[name] for s in shards], dim=plan[name].dim) if name in plan else value
            for name, value in shards[0].items()}


def consolidate(run_dir: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Write `<out>/model.pt` and `<out>/config.yaml`; default out: run_dir/consolidated/step_N. The weights come
    from the checkpoint's layout-free form when it has one (the same weights, already whole), else from its
    engine's own files; the config is the run's with a one-device layout (tensor = pipeline = 1)."""
    from bigtrain.checkpoint.weights import checkpoint_weights

    checkpoint = find_checkpoint(run_dir, step)
    raw, state = checkpoint_weights(checkpoint)
    out = out or run_dir / "consolidated" / checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    with ckpt.writing(out / "model.pt"):
        torch.save(state, out / "model.pt")
    (out / "config.yaml").write_text(dump_config(config_from_dict(raw)))
    return out
