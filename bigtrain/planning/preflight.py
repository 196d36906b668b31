"""Before any allocation: will this rank's share of the model fit in the memory that is free?

A lower bound of what a rank needs, from the model built on the meta device (no memory used):

    model state  parameters + gradients + optimizer state per the ZeRO formulas (`planning/zero.py`), of this
                 rank's 1 / (tensor · pipeline) share of the parameters
    buffers      position tables (rotary, sinusoidal), whole on every rank
    activations  Korthikanti et al. 2022 without the attention-score term: 34·s·b·h bytes per block (2·s·b·h
                 with full checkpointing), for this rank's blocks, at micro_batch_size b

It is compared with the free memory of the device (`MemAvailable` on the CPU, shared by the ranks of one node;
`torch.cuda.mem_get_info` on a GPU). Being a lower bound, it never refuses a run that fits; it stops the ones
that cannot (a 10⁹-wide model once failed after 8 s on a 1.3 TB allocation) in a second, with the numbers.
`bigtrain plan` (later) predicts memory in full.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import torch

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.errors import ConfigError
from bigtrain.models import TransformerLM, build_model, count_parameters
from bigtrain.planning.zero import zero_formula

GiB = 2**30


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` for one rank, or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
        else:
            return None
    except OSError:
        return None
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return free // max(1, ranks_here)


def needed_bytes(cfg: Config, model: TransformerLM, layout: Layout) -> dict[str, int]:
    """The lower bound described in the module docstring, by part."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    share = layout.tensor * layout.pipeline
    n_params = count_parameters(model) // share
    master = t.precision != "fp32" and p.zero_stage > 0
    state = zero_formula(n_params, p.zero_stage, layout.data, t.precision, master_copy=master)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    blocks = -(-sum(len(stack) for stack in model.stacks()) // layout.pipeline)
    per_block = 2 if p.activation_checkpointing == "full" else 34
    sbh = cfg.data.seq_len * t.micro_batch_size * m.d_model
    activations = per_block * sbh * blocks // layout.tensor
    return {"parameters": state.params, "gradients": state.grads, "optimizer state": state.optimizer,
            "buffers": buffers, "activations": activations}


def shapes_model(cfg: Config, vocab: int, device: torch.device) -> TransformerLM:
    """The model on the meta device (shapes only), or ConfigError where one of its tensors is too large for torch
    to describe at all (more than 2⁶³ bytes: a 10⁹-wide model's joined Q, K, V projection is 3·10¹⁸ entries)."""
    try:
        return build_model(cfg.model, vocab, "meta")
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise
        m = cfg.model
        # attention's Q, K, V and output projections (4·d² per block) and the embedding, fp32: a lower bound
        floor = 4 * (4 * m.d_model**2 * m.n_layers + vocab * m.d_model)
        _refuse(cfg, vocab, floor, "attention projections and embedding alone, in fp32; one tensor is too large "
                f"for torch's size arithmetic ({error})", available_bytes(device), device)


def check_memory(cfg: Config, model: TransformerLM, layout: Layout, device: torch.device) -> None:
    """Raise ConfigError when the lower bound exceeds the free memory of `device`."""
    free = available_bytes(device)
    if free is None:
        return
    parts = needed_bytes(cfg, model, layout)
    total = sum(parts.values())
    if total <= free:
        return
    detail = ", ".join(f"{name} {value / GiB:.3g}" for name, value in parts.items() if value)
    _refuse(cfg, model.vocab_size, total, f"{detail} GiB", free, device)


def _refuse(cfg: Config, vocab: int, total: int, detail: str, free: int | None, device: torch.device) -> NoReturn:
    """The one message for a model that cannot fit: what it needs, what is free, and the keys that change it."""
    room = "an unknown amount of memory is" if free is None else f"{free / GiB:.3g} GiB are"
    raise ConfigError(
        f"The model does not fit: each rank needs at least {total / GiB:.3g} GiB ({detail}; model.d_model="
        f"{cfg.model.d_model}, n_layers={cfg.model.n_layers}, max_seq_len={cfg.model.max_seq_len}, vocabulary "
        f"{vocab}, train.micro_batch_size={cfg.train.micro_batch_size}) but {room} "
        f"free on {device}. Use a smaller model or micro-batch, more ranks with parallel.tensor / "
        f"parallel.pipeline / parallel.zero_stage, or parallel.activation_checkpointing=full.")
