"""Turn a checkpoint of any engine into one full set of fp32 weights that single-device bigtrain loads.

The layout that wrote the checkpoint (`SavedCheckpoint.layout`) says whose files to read; each engine kind has
one reader of its own files, which returns the whole state of one tensor rank:

    torch       model.pt (the whole model)
    deepspeed   ZeRO-0 model states, or ZeRO-1/2/3 partitions reassembled by DeepSpeed's zero_to_fp32
    pipeline    one file per layer (and tensor rank), keyed by the unsplit model's parameter names
    fairscale   data rank 0's model (OSS), or every data rank's flat shards put back together (FSDP)
    fsdp2       every data rank's rows put back together

Under tensor parallelism the tensor ranks' states are then concatenated along the dimension the split cut
(`shard_plan`). `bigtrain consolidate` writes the result as `model.pt` (a plain state dict, loadable with
`weights_only=True`) beside the run's `config.yaml` with a one-device layout.
"""

from __future__ import annotations

import torch

from bigtrain.checkpoint.saved import SavedCheckpoint
from bigtrain.config import ModelConfig
from bigtrain.errors import CheckpointError
from bigtrain.io import load_failure, load_torch


def _tensor_rank_state(saved: SavedCheckpoint, tensor_rank: int) -> dict[str, torch.Tensor]:
    layout, checkpoint = saved.layout, saved.path
    if layout.engine == "torch":
        return load_torch(checkpoint / "model.pt")
    if layout.engine == "fairscale":
        from bigtrain.engine.fairscale import files as fairscale_files

        return fairscale_files.tensor_rank_state(checkpoint, layout, tensor_rank)
    if layout.engine == "fsdp2":
        from bigtrain.engine.fsdp2 import files as fsdp2_files

        return fsdp2_files.tensor_rank_state(checkpoint, layout, tensor_rank)
    if layout.engine == "torch_pipeline":
        from bigtrain.engine.torch_pipeline import files as torch_pipeline

        return torch_pipeline.tensor_rank_state(checkpoint, layout, tensor_rank, saved.config.model.tie_embeddings)
    from bigtrain.engine.deepspeed import files as deepspeed_files

    return deepspeed_files.tensor_rank_state(checkpoint, layout, tensor_rank, saved.config.model.tie_embeddings)


def consolidated_state_dict(saved: SavedCheckpoint) -> dict[str, torch.Tensor]:
    """One full fp32 state dict from the engine's own files of `saved`; every file is read by the weights-only
    unpickler, so no code stored in a file runs."""
    try:
        shards = [_tensor_rank_state(saved, r) for r in range(saved.layout.tensor)]
    except CheckpointError:
        raise
    except Exception as exc:  # a refused pickle, a truncated or foreign file
        raise CheckpointError(f"Cannot read the checkpoint {saved.path} ({load_failure(exc)}). Its files are "
                              f"damaged, were not written by bigtrain, or hold objects that are not plain data "
                              f"(refused).") from None
    state = merge_tensor_shards(shards, saved.config.model) if len(shards) > 1 else shards[0]
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def merge_tensor_shards(shards: list[dict[str, torch.Tensor]], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One state dict from the tensor ranks' state dicts: split parameters concatenated along their dim."""
    from bigtrain.parallel.tensor import shard_plan

    vocab = shards[0]["embed.tokens.weight"].shape[0] * len(shards)
    plan = shard_plan(model_cfg, vocab, len(shards))
    return {name: torch.cat([s[name] for s in shards], dim=plan[name].dim) if name in plan else value
            for name, value in shards[0].items()}

