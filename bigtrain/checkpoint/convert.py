"""Give a checkpoint written without its layout-free form (checkpoint.layout_free_every=0, or an earlier bigtrain)
that form, so that it can be resumed under any layout (`bigtrain convert` starts one process per rank that wrote
it and runs `convert_here` on each).

Every rank of the layout that wrote the checkpoint (`SavedCheckpoint.layout`) builds its engine, loads the
engine's own files, and writes the pieces it owns exactly as a save would, into a staging folder; rank 0 then
moves the form into the checkpoint and adds its files to the manifest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from bigtrain.checkpoint.integrity import step_of, write_manifest
from bigtrain.checkpoint.layout_free import FOLDER
from bigtrain.checkpoint.manager import layout_free_header
from bigtrain.checkpoint.save import write_layout_free
from bigtrain.checkpoint.saved import SavedCheckpoint
from bigtrain.checkpoint.state import StateAdapter
from bigtrain.errors import CheckpointError

STAGING = ".converting"


def convert_here(checkpoint: Path) -> None:
    """On every rank of the layout that wrote `checkpoint`: load it, write its layout-free form beside."""
    from bigtrain.data import build_tokenizer
    from bigtrain.distributed import detect_env, init_process_group, shutdown_process_group
    from bigtrain.distributed.device import resolve_device
    from bigtrain.distributed.groups import ParallelGroups
    from bigtrain.engine import build_engine
    from bigtrain.models import build_model, resolve_vocab_size
    from bigtrain.parallel import parallelize

    env = detect_env()
    saved = SavedCheckpoint.read(checkpoint)
    cfg, layout = saved.config, saved.layout
    if env.world_size != layout.world_size:
        raise CheckpointError(f"{checkpoint} was written by {layout.world_size} rank(s); convert it with as many "
                              f"(this is {env.world_size}).")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    device = resolve_device(cfg.train, env.local_rank)
    groups = None
    if layout.distributed:
        init_process_group(env, device, timeout_s=cfg.parallel.collective_timeout)
        groups = ParallelGroups(layout, env.rank, cfg.parallel.collective_timeout, on_gpu=device.type == "cuda")
    tokenizer = build_tokenizer(cfg.data)
    vocab = resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    parallel = parallelize(build_model(cfg.model, vocab, "meta"), cfg, groups, device)
    engine = build_engine(cfg, layout, parallel, groups, device)
    engine.read_native(checkpoint)
    staging = checkpoint / STAGING
    barrier = groups.host_barrier if groups is not None else (lambda: None)
    if env.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    header = layout_free_header(cfg, layout, build_model(cfg.model, vocab, "meta"), saved.trainer_state)
    write_layout_free(staging, StateAdapter(engine.sharded_state()), env.rank, layout.world_size, header, barrier)
    barrier()
    if env.rank == 0:
        os.rename(staging / FOLDER, checkpoint / FOLDER)
        shutil.rmtree(staging)
        write_manifest(checkpoint, step_of(checkpoint), layout)
    barrier()
    shutdown_process_group()
