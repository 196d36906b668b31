"""DeepSpeed's own checkpoint files, read without an engine (consolidation into one set of weights).

    ZeRO-0              mp_rank_TT_model_states.pt: the whole model of tensor rank TT (`module`)
    ZeRO-1/2/3          the fp32 master weights in per-rank partitions (`*_optim_states.pt`, ZeRO-3 also its
                        parameter partitions), which DeepSpeed's `zero_to_fp32` reassembles; each tensor rank's
                        files are given to it on their own
    pipeline            layer_LL-model_TT-model_states.pt: one file per layer and tensor rank, keyed by the unsplit
                        model's parameter names; exactly the trained weights in fp32, under bf16/fp16 the 16-bit
                        copies (DeepSpeed keeps the fp32 masters in its optimizer partitions)

Every file is read by the weights-only unpickler (DeepSpeed's `zero_to_fp32` included).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bigtrain.compat.deepspeed import (
    fp32_state_dict_from_zero,
    model_states_file,
    pipeline_layer_files,
    safe_checkpoint_loading,
    tensor_rank_files,
)
from bigtrain.config.layout import Layout


def _zero_state(checkpoint: Path, stage: int, tensor_rank: int) -> dict[str, torch.Tensor]:
    """The whole (unsplit by ZeRO) state of one tensor rank's files."""
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
    """Union of one tensor rank's pipeline layer files."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint.glob(pipeline_layer_files(tensor, tensor_rank))):
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def tensor_rank_state(checkpoint: Path, layout: Layout, tensor_rank: int,
                      tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """One tensor rank's whole state from the files a DeepSpeed engine of `layout` wrote."""
    with safe_checkpoint_loading():
        if layout.pipeline > 1:
            state = _pipeline_state(checkpoint, layout.tensor, tensor_rank)
        else:
            state = _zero_state(checkpoint, layout.zero_stage, tensor_rank)
    if tie_embeddings:  # zero_to_fp32 restores tied names only where DeepSpeed recorded the sharing
        state.setdefault("head.weight", state["embed.tokens.weight"])
    return state
