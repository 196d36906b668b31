"""Ranks started by mpirun / mpiexec: rank, size and local rank from MPI itself (mpi4py), and a rendezvous that
rank 0 picks and broadcasts, as `deepspeed.init_distributed(auto_mpi_discovery=True)` does.

mpi4py is optional (`pip install -e .[mpi]`). Without it the launcher's own variables give rank and size, and
MASTER_ADDR / MASTER_PORT must be exported to every rank (`mpiexec -genv MASTER_ADDR host -genv MASTER_PORT p`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from bigtrain.distributed.rendezvous import DistEnv, free_port
from bigtrain.errors import ConfigError


def mpi_rendezvous(env: Mapping[str, str], family: str, from_env: dict[str, int]) -> DistEnv:
    """The DistEnv of this MPI rank. `from_env` holds what the variables say, as integers (rank; world_size,
    local_rank and master_port when set); mpi4py, when installed, must agree with them."""
    try:
        from mpi4py import MPI
    except ImportError:
        return _without_mpi4py(env, family, from_env, "mpi4py is not installed")
    except RuntimeError as exc:  # installed, but no MPI library it can load
        return _without_mpi4py(env, family, from_env, f"mpi4py cannot load an MPI library ({str(exc).splitlines()[0]})")
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    expected = from_env.get("world_size")
    if expected is not None and (size, rank) != (expected, from_env["rank"]):
        raise ConfigError(
            f"{family}'s launcher started {expected} ranks (this is rank {from_env['rank']}), but mpi4py sees "
            f"rank {rank} of {size}: mpi4py is linked against another MPI ({MPI.Get_library_version().splitlines()[0]})"
            f". Start the job with the mpiexec of that MPI, or reinstall mpi4py against yours "
            f"(pip install --no-binary mpi4py mpi4py).")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    if rank == 0:
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_size == size else socket.gethostname())
        port = from_env.get("master_port") or free_port(bind="")
        rendezvous = (addr, port)
    else:
        rendezvous = None
    addr, port = comm.bcast(rendezvous, root=0)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=size, launcher="mpi", master_addr=addr,
                   master_port=port)


def _without_mpi4py(env: Mapping[str, str], family: str, from_env: dict[str, int], why: str) -> DistEnv:
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing or "world_size" not in from_env:
        need = ", ".join(missing) if missing else "the world size (PMIx exports none)"
        raise ConfigError(
            f"Started by mpirun/mpiexec ({family}) but {why}, and the environment lacks {need}. "
            f"Install mpi4py (`pip install -e .[mpi]`; `pip install mpich` where no MPI is installed), or "
            f"export MASTER_ADDR and MASTER_PORT to every rank (mpiexec -genv MASTER_ADDR <host> -genv "
            f"MASTER_PORT <port>).")
    return DistEnv(rank=from_env["rank"], local_rank=from_env.get("local_rank", from_env["rank"]),
                   world_size=from_env["world_size"], launcher="mpi", master_addr=env["MASTER_ADDR"],
                   master_port=from_env["master_port"])
