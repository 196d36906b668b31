"""`bigtrain convert`: give a checkpoint written without its layout-free form (checkpoint.layout_free_every=0, or
an earlier bigtrain) that form, so that it can be resumed under any layout.

The checkpoint is loaded by the layout that wrote it, from its engine's own files, on this machine's CPUs (or
GPUs): one process per rank that wrote it, started here (`run_convert`), each then writing the pieces it owns
exactly as a save would. The new files join the checkpoint's manifest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bigtrain.checkpoint import store as ckpt
from bigtrain.checkpoint.integrity import step_of, verify, write_manifest
from bigtrain.checkpoint.layout_free import FOLDER, INDEX
from bigtrain.config.layout import Layout, resolve_layout
from bigtrain.errors import CheckpointError

STAGING = ".converting"


def resolve_checkpoint(path: Path) -> Path:
    if (path / "checkpoints").is_dir():
        from bigtrain.checkpoint.consolidate import find_checkpoint

        return find_checkpoint(path, None)
    if not (path / "config.yaml").exists():
        raise CheckpointError(f"{path} is neither a run.dir nor a checkpoint folder (step_N with a config.yaml).")
    return path


def run_convert(path: Path) -> Path:
    """Convert the checkpoint at `path` (a run.dir: its latest): in this process when one rank wrote it, else
    under torchrun with as many ranks as wrote it."""
    checkpoint = resolve_checkpoint(path)
    if (checkpoint / FOLDER / INDEX).exists():
        return checkpoint
    reason = verify(checkpoint)
    if reason is not None:
        raise CheckpointError(f"Checkpoint {checkpoint} is damaged: {reason}; it cannot be converted.")
    ranks = ckpt.ranks_that_wrote(checkpoint)
    if ranks == 1:
        convert_here(checkpoint)
        return checkpoint
    from bigtrain.distributed.env import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "bigtrain.cli.convert_worker", str(checkpoint)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise CheckpointError(f"Converting {checkpoint} with {ranks} ranks failed (status {proc.returncode}; see "
                              f"the messages above).")
    return checkpoint


def convert_here(checkpoint: Path) -> None:
    """On every rank of the layout that wrote `checkpoint`: load it, write its layout-free form beside."""
    from bigtrain.checkpoint.resume import layout_free_header
    from bigtrain.checkpoint.sequence import write_layout_free
    from bigtrain.data import build_tokenizer
    from bigtrain.distributed import detect_env, init_process_group, shutdown_process_group
    from bigtrain.distributed.device import resolve_device
    from bigtrain.distributed.groups import ParallelGroups
    from bigtrain.engine import build_engine
    from bigtrain.models import build_model, resolve_vocab_size
    from bigtrain.parallel import parallelize

    env = detect_env()
    cfg, world = ckpt.saved_config(checkpoint)
    if env.world_size != world:
        raise CheckpointError(f"{checkpoint} was written by {world} rank(s); convert it with as many "
                              f"(this is {env.world_size}).")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    device = resolve_device(cfg.train, env.local_rank)
    p = cfg.parallel
    groups = None
    if resolve_layout(cfg, world).distributed:
        init_process_group(env, device, timeout_s=p.collective_timeout)
        groups = ParallelGroups(Layout.for_world(p.tensor, p.pipeline, world, p.data), env.rank)
    tokenizer = build_tokenizer(cfg.data)
    vocab = resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    parallel = parallelize(build_model(cfg.model, vocab, "meta"), cfg, groups, device)
    engine = build_engine(cfg, parallel, env, groups, device)
    state = engine.load(checkpoint)
    staging = checkpoint / STAGING
    barrier = torch.distributed.barrier if groups is not None else (lambda: None)
    if env.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    header = layout_free_header(cfg, build_model(cfg.model, vocab, "meta"), state, world)
    write_layout_free(staging, engine.state(), env.rank, world, header, barrier=barrier)
    barrier()
    if env.rank == 0:
        os.rename(staging / FOLDER, checkpoint / FOLDER)
        shutil.rmtree(staging)
        write_manifest(checkpoint, step_of(checkpoint))
    barrier()
    shutdown_process_group()
