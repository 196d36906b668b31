"""How a command starts processes of its own (`bigtrain parity`'s two runs, `bigtrain convert`'s ranks): the same
Python and the same bigtrain as the command itself, whether it runs from a checkout or an installed wheel, one
intra-op thread per CPU rank unless the environment says otherwise, under torchrun on a free local port."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bigtrain


def child_env() -> dict[str, str]:
    """This environment, with this bigtrain first on the module path and OMP_NUM_THREADS defaulting to 1."""
    here = str(Path(bigtrain.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": path}


def torchrun(ranks: int) -> list[str]:
    """The start of a command line that runs `ranks` local ranks under torchrun (then a script, or `-m MODULE`)."""
    from bigtrain.distributed.rendezvous import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]
