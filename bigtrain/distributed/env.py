"""Which rank this process is, from the launcher's environment, and the process group set-up.

DeepSpeed's launcher and torchrun both export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
No launcher means one process: world size 1 (DeepSpeed still gets a one-rank group when it is used).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from bigtrain.errors import ConfigError

REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_name() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "CROSS_RANK" in os.environ or "DS_ACCELERATOR" in os.environ or "PDSH_RCMD_TYPE" in os.environ:
        return "deepspeed"
    return "env"


def detect_env() -> DistEnv:
    """The rank layout from the environment; a half-set environment is an error naming what is missing."""
    present = [k for k in REQUIRED if k in os.environ]
    if not present:
        return DistEnv(rank=0, local_rank=0, world_size=1, launcher="none")
    missing = [k for k in REQUIRED if k not in os.environ]
    if missing:
        raise ConfigError(f"The environment sets {', '.join(present)} but not {', '.join(missing)}: a launcher "
                          f"(deepspeed, torchrun) sets all of {', '.join(REQUIRED)}. Start the job through a "
                          f"launcher, or unset {', '.join(present)} to run as one process.")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ConfigError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers: {exc}.") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world}).")
    return DistEnv(rank=rank, local_rank=local, world_size=world, launcher=_launcher_name())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Start the default process group through DeepSpeed: gloo on CPU, nccl on GPU."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    if env.launcher == "none":  # one process without a launcher: a one-rank group on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
