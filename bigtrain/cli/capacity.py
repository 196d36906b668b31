"""How many ranks this machine can hold, checked before any is started: by a command that launches ranks
(`bigtrain parity`, `bigtrain convert`) before it starts one, and by every rank a launcher started (torchrun with
--nproc_per_node=64 on a 2-core machine) before it imports torch.

    CPU cores   the CPUs this process may use (`os.sched_getaffinity`: taskset, a cgroup cpuset), RANKS_PER_CORE
                ranks each at most
    memory      MemAvailable of /proc/meminfo, RANK_BYTES per rank at least
    GPUs        one rank per visible GPU, when the ranks run on GPUs

RANKS_PER_CORE = 4: a CPU rank runs one intra-op thread (`bigtrain.cli.launching.child_env`); the test suite runs
4 ranks on 2 cores. Far beyond that, start-up alone (each rank imports torch) takes minutes and every collective
waits for ranks the scheduler has set aside. RANK_BYTES = 400 MiB: the peak resident memory measured of a rank of
the tiny test model (a 2-rank DeepSpeed ZeRO-1 CPU run: 399 MiB; the interpreter, torch and DeepSpeed). A rank of
a real model needs more; its own preflight (`bigtrain/planning/preflight.py`) checks the model's bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bigtrain.errors import ConfigError

RANKS_PER_CORE = 4
RANK_BYTES = 400 * 2**20
GiB = 2**30
# Where launchers say how many ranks they started on this node: torchrun and accelerate, DeepSpeed's launcher,
# Open MPI, MPICH / Intel MPI.
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def usable_cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """MemAvailable in bytes, or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Capacity:
    """What this machine offers to ranks, and how many it can hold."""

    cores: int
    memory: int | None  # bytes available; None: unknown (not limited)
    gpus: int | None  # visible GPUs when the ranks run on GPUs; None: CPU ranks

    @classmethod
    def here(cls, gpus: int | None = None) -> Capacity:
        return cls(usable_cores(), available_memory(), gpus)

    def limits(self) -> dict[str, tuple[int, str]]:
        """Each resource's limit on the rank count, with how it was counted."""
        out = {"cores": (RANKS_PER_CORE * self.cores, f"{self.cores} CPU core(s) this process may use, at most "
                                                       f"{RANKS_PER_CORE} ranks each: {RANKS_PER_CORE * self.cores}")}
        if self.memory is not None:
            fit = self.memory // RANK_BYTES
            out["memory"] = (fit, f"{self.memory / GiB:.3g} GiB of memory available (MemAvailable), at least "
                                  f"{RANK_BYTES / GiB:.3g} GiB per rank: {fit}")
        if self.gpus is not None:
            out["gpus"] = (self.gpus, f"{self.gpus} visible GPU(s), one rank each: {self.gpus}")
        return out

    def holds(self) -> int:
        return min(limit for limit, _ in self.limits().values())

    def refusal(self, ranks: int, asked: str, fix: str) -> str | None:
        """None when `ranks` fit; else the paragraph that refuses them (`asked`: what asked for them, with the
        number, e.g. "--layout data=1000 needs 1000 ranks")."""
        if ranks <= self.holds():
            return None
        detail = "; ".join(text for _, text in self.limits().values())
        return (f"{asked} on this machine, which can hold {self.holds()} ({detail}). Nothing was "
                f"started. {fix}")


def check_local_ranks(ranks: int, asked: str, fix: str, gpus: int | None = None) -> None:
    """Raise ConfigError when this machine cannot hold `ranks` local ranks (`gpus`: visible GPUs, for GPU ranks)."""
    message = Capacity.here(gpus).refusal(ranks, asked, fix)
    if message:
        raise ConfigError(message)


def visible_gpus(device: str) -> int | None:
    """The GPUs ranks with `train.device=device` would use (None: they run on the CPU), as they decide it
    (`bigtrain.distributed.device.resolve_device`)."""
    if device == "cpu":
        return None
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def launched_ranks_refusal() -> str | None:
    """In a rank a launcher started: the refusal when the launcher started more ranks on this machine than it can
    hold (read from the launcher's variables; no torch needed), else None."""
    for name in LOCAL_SIZE_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return Capacity.here().refusal(
                int(value), f"The launcher started {value} ranks ({name}={value})",
                "Start at most that many ranks per machine (torchrun --nproc_per_node, deepspeed --num_gpus, the "
                "hostfile's slots), or spread them over more machines.")
    return None


def first_on_this_machine() -> bool:
    """Whether this rank is the first its launcher started on this machine (the one that speaks for the others)."""
    return all(os.environ.get(name, "0") == "0" for name in LOCAL_RANK_VARS)
