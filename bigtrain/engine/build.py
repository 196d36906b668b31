"""`build_engine`: the engine that runs a parallelized model's steps and checkpoints, chosen by the layout."""

from __future__ import annotations

import torch

from bigtrain.config import Config
from bigtrain.distributed import DistEnv
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.base import Engine
from bigtrain.parallel import ParallelModel


def build_engine(cfg: Config, parallel: ParallelModel, env: DistEnv, groups: ParallelGroups | None,
                 device: torch.device) -> Engine:
    """Plain PyTorch on one process (no process groups), fairscale when parallel.engine says so, DeepSpeed's
    pipeline engine when the layout has pipeline stages, else DeepSpeed data parallelism / ZeRO."""
    if groups is None:
        from bigtrain.engine.local import LocalEngine

        return LocalEngine(cfg, parallel, device)
    if cfg.parallel.engine == "fairscale":
        from bigtrain.engine.fairscale.engine import FairscaleEngine

        return FairscaleEngine(cfg, parallel, env, groups, device)
    if parallel.layout.pipeline > 1:
        from bigtrain.engine.deepspeed.pipeline import PipelineEngine

        return PipelineEngine(cfg, parallel, env, groups)
    from bigtrain.engine.deepspeed.engine import DeepSpeedEngine

    return DeepSpeedEngine(cfg, parallel, env, groups)
