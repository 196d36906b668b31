"""Where this rank stands: its rank, local rank and world size, the launcher that started it and its rendezvous
(`DistEnv`), the rank the launcher's variables state before any rendezvous (`stated_rank`), and a free TCP port
for a rendezvous this process picks itself. No torch: a command's argument error reads its rank here."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

# (rank, world size, local rank) variables of each MPI family; PMIx exports no size (mpi4py supplies it).
MPI_VARS = {
    "Open MPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "MPICH / Intel MPI": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    "MVAPICH": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    "PMIx": ("PMIX_RANK", None, None),
}


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


def stated_rank(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) as the launcher's variables state them (torchrun's and the others' RANK, MPI's, an srun
    step's), read without a rendezvous and never failing (a variable that is not a number counts as one
    process): for a message before the process group exists, which only rank 0 prints."""
    env = os.environ if environ is None else environ
    pairs = [("RANK", "WORLD_SIZE"), *((rank, size) for rank, size, _ in MPI_VARS.values())]
    if "SLURM_STEP_ID" in env:
        pairs.append(("SLURM_PROCID", "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"))
    for rank_var, size_var in pairs:
        if rank_var in env:
            rank, world = env.get(rank_var, ""), env.get(size_var or "", "")
            if rank.isdigit() and world.isdigit() and int(rank) < int(world):
                return int(rank), int(world)
            return (int(rank), 2) if rank.isdigit() else (0, 1)  # PMIx states no size: more than one process
    return 0, 1
