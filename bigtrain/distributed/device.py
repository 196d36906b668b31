"""Device choice and mixed precision: autocast for bf16/fp16, dynamic loss scaling for fp16."""

from __future__ import annotations

import contextlib

import torch

from bigtrain.config import TrainConfig
from bigtrain.errors import ConfigError


def resolve_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    """The device of this rank: cuda:<local rank> on GPU machines, else the CPU."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA GPU is visible. Use train.device=cpu (or auto), or "
                          "install a CUDA build of torch (see README).")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs a CUDA GPU (fp16 autocast and loss scaling are GPU "
                          "features). On CPU use train.precision=bf16 or fp32.")
    if precision == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(f"train.precision='fp8' needs a GPU of compute capability >= 8.9 (Ada, Hopper or "
                              f"newer: FP8 tensor cores); {torch.cuda.get_device_name(device)} has {major}.{minor}. "
                              f"Use train.precision=bf16 on this GPU (on a CPU, FP8 is emulated for tests).")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision region for forward passes; fp32 runs without autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for fp16: scale the loss up, skip steps with inf/NaN gradients, adapt the scale."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
