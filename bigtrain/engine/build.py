"""`build_engine`: the engine the resolved layout names (`Layout.engine`), around a parallelized model."""

from __future__ import annotations

import torch

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.engine.base import Engine
from bigtrain.parallel import ParallelModel

ENGINE_CLASSES = {  # layout.engine -> the class that runs it (docs/architecture.md lists them)
    "torch": "bigtrain.engine.local.LocalEngine",
    "deepspeed": "bigtrain.engine.deepspeed.engine.DeepSpeedEngine",
    "pipeline": "bigtrain.engine.deepspeed.pipeline.PipelineEngine",
    "fairscale": "bigtrain.engine.fairscale.engine.FairscaleEngine",
    "fsdp2": "bigtrain.engine.fsdp2.engine.Fsdp2Engine",
    "torch_pipeline": "bigtrain.engine.torch_pipeline.engine.TorchPipelineEngine",
}


def build_engine(cfg: Config, layout: Layout, parallel: ParallelModel, groups: ParallelGroups | None,
                 device: torch.device) -> Engine:
    """The plain engine on one process (no process groups); otherwise DeepSpeed's data-parallel or pipeline
    engine, fairscale's, PyTorch's FSDP2 or its pipeline schedules, as `layout.engine` says."""
    if layout.engine == "torch":
        from bigtrain.engine.local import LocalEngine

        return LocalEngine(cfg, layout, parallel, groups, device)
    assert groups is not None, f"the {layout.engine} engine runs over process groups"
    if layout.engine == "fairscale":
        from bigtrain.engine.fairscale.engine import FairscaleEngine

        return FairscaleEngine(cfg, layout, parallel, groups, device)
    if layout.engine == "fsdp2":
        from bigtrain.engine.fsdp2.engine import Fsdp2Engine

        return Fsdp2Engine(cfg, layout, parallel, groups, device)
    if layout.engine == "torch_pipeline":
        from bigtrain.engine.torch_pipeline.engine import TorchPipelineEngine

        return TorchPipelineEngine(cfg, layout, parallel, groups, device)
    if layout.engine == "pipeline":
        from bigtrain.engine.deepspeed.pipeline import PipelineEngine

        return PipelineEngine(cfg, layout, parallel, groups, device)
    from bigtrain.engine.deepspeed.engine import DeepSpeedEngine

    return DeepSpeedEngine(cfg, layout, parallel, groups, device)
