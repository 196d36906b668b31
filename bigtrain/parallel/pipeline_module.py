"""The DeepSpeed `PipelineModule` of a bigtrain model (see `pipeline.py` for the layers).

Partitioning (`parallel.partition_method`) is DeepSpeed's: `parameters` balances parameter counts, `uniform`
balances layer counts, `type:<regex>` balances the layers whose class name matches (e.g. `type:BlockPipe`).
Parameter counts come from the meta model, so no rank builds a layer it does not own. A partition that leaves
a stage without layers is refused with the numbers that cause it. The DeepSpeed internals this needs are in
`bigtrain.compat.deepspeed`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from bigtrain.compat.deepspeed import pipeline_module_class
from bigtrain.compat.deepspeed import stage_boundaries as ds_stage_boundaries
from bigtrain.compat.deepspeed_import import import_deepspeed
from bigtrain.config.layout import Layout
from bigtrain.errors import ConfigError
from bigtrain.models import TransformerLM
from bigtrain.parallel.context.inputs import ContextInputs
from bigtrain.parallel.pipeline import layer_specs


def stage_boundaries(specs: list, stages: int, method: str) -> list[int]:
    """DeepSpeed's partition of `specs` into `stages`: layer indices [b_0 = 0, b_1, ..., b_stages = len]."""
    if method == "uniform":
        return ds_stage_boundaries([1] * len(specs), stages, uniform=True)
    if method == "parameters":
        return ds_stage_boundaries([s.n_params for s in specs], stages, uniform=False)
    if method.startswith("type:"):
        pattern = re.compile(method[len("type:"):], re.IGNORECASE)
        weights = [1 if pattern.search(getattr(s, "typename", type(s)).__name__) else 0 for s in specs]
        return ds_stage_boundaries(weights, stages, uniform=False)
    raise ConfigError(f"parallel.partition_method={method!r} is not known; use 'parameters', 'uniform' or "
                      f"'type:<regex of a layer class>' (e.g. 'type:BlockPipe').")


def check_stages(specs: list, stages: int, method: str, virtual_stages: int = 1) -> list[int]:
    """The partition of `specs` into `stages` (= parallel.pipeline x parallel.virtual_stages); ConfigError naming
    the keys when a stage would get no layer."""
    bounds = stage_boundaries(specs, stages, method)
    sizes = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if any(size == 0 for size in sizes):
        what = (f"parallel.pipeline={stages // virtual_stages} x parallel.virtual_stages={virtual_stages} = "
                f"{stages} stages" if virtual_stages > 1 else f"parallel.pipeline={stages}")
        raise ConfigError(
            f"{what} with parallel.partition_method={method!r} leaves a stage without "
            f"layers (layers per stage: {sizes}; the model has {len(specs)} pipeline layers: embedding, blocks, "
            f"norm(s), head). Use fewer stages{' (or virtual stages)' if virtual_stages > 1 else ''}, more "
            f"model.n_layers, or partition_method=uniform.")
    return bounds


def build_pipeline_module(model: TransformerLM, layout: Layout, partition_method: str,
                          materialize: Callable[[nn.Module], None], documents: bool = False,
                          context: ContextInputs | None = None) -> nn.Module:
    """This rank's stage of `model` (on the meta device; `materialize` allocates and initializes a piece).
    The engine sets its `loss_fn`. `documents`: batches carry document ids (`data.document_masking`).

    Under context parallelism DeepSpeed's data axis is data × context (D·C ranks that hold the same weights):
    rank = ((pipe · D + data) · C + context) · T + tensor is DeepSpeed's (pipe · D·C + data·C + context) · T +
    model, so its data-parallel groups are bigtrain's gradient groups and each rank's neighbouring stages are
    those of its own context rank (the activations it sends are its own tokens)."""
    import_deepspeed()
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor,
                                             num_dp=layout.data * layout.context)
    return pipeline_module_class()(layer_specs(model, materialize, documents, context), topology=topology,
                                   loss_fn=None,
                                   partition_method=partition_method, dynamic_shape=model.family != "causal",
                                   check_partition=check_stages)
