"""Where this rank stands: its rank, local rank and world size, the launcher that started it and its rendezvous
(`DistEnv`), and a free TCP port for a rendezvous this process picks itself."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # torchrun | deepspeed | accelerate | env | mpi | slurm | none
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: one process, a free port is picked at start-up
    note: str | None = None  # something rank 0 tells the user (e.g. a Slurm batch shell without srun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.world_size == 1 and self.launcher == "none":
            return "launcher: none"
        return f"launcher: {self.launcher}, rendezvous {self.master_addr}:{self.master_port}"

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous and DeepSpeed read."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def free_port(bind: str = "127.0.0.1") -> int:
    """A TCP port that is free now on `bind` ("" = every interface, for a rendezvous other nodes reach)."""
    with socket.socket() as s:
        s.bind((bind, 0))
        return s.getsockname()[1]
