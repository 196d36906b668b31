"""log.attention_images: at each evaluation, the attention maps of the first held-out sample (its first
`MAX_TOKENS` tokens, for legibility) as one picture for TensorBoard."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from bigtrain.data import Tokenizer
from bigtrain.data.collate import collate
from bigtrain.inference.attention_data import group, record, token_labels
from bigtrain.models.loss import model_inputs

MAX_TOKENS = 32
TAG = "attention_maps"


def first_sample(family: str, tokenizer: Tokenizer, heldout: Dataset, device: torch.device
                 ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]] | None:
    """The model's inputs of the first held-out sample cut to MAX_TOKENS per side, and their token labels."""
    if len(heldout) == 0:
        return None
    batch = collate([heldout[0]], family, tokenizer.pad_id)
    inputs = {k: v[:, :MAX_TOKENS].to(device) for k, v in model_inputs(batch).items()}
    labels = {"input": token_labels(tokenizer, inputs["input_ids"][0].tolist())}
    if "decoder_input_ids" in inputs:
        labels["target"] = token_labels(tokenizer, inputs["decoder_input_ids"][0].tolist())
    return inputs, labels


def attention_image(model: nn.Module, family: str, tokenizer: Tokenizer, heldout: Dataset, device: torch.device,
                    autocast: Callable[[], contextlib.AbstractContextManager], step: int, draw: bool
                    ) -> np.ndarray | None:
    """Every rank calls this (ZeRO-3 gathers parameters inside the forward); the one that `draw`s gets the
    picture, RGB [height, width, 3] uint8, the others None."""
    sample = first_sample(family, tokenizer, heldout, device)
    if sample is None:
        return None
    inputs, labels = sample
    maps = record(model, inputs, autocast)
    if not draw:
        return None
    from bigtrain.inference import attention_plot  # matplotlib: imported by the rank that draws only

    title = f"step {step}: first held-out sample (up to {MAX_TOKENS} tokens)"
    return attention_plot.to_rgb(attention_plot.draw(group(maps, family, labels), title))
