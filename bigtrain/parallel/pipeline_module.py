"""The DeepSpeed `PipelineModule` of a bigtrain model (imports DeepSpeed; see `pipeline.py` for the layers).

Partitioning (`parallel.partition_method`) is DeepSpeed's: `parameters` balances parameter counts, `uniform`
balances layer counts, `type:<regex>` balances the layers whose class name matches (e.g. `type:BlockPipe`).
Parameter counts come from the meta model, so no rank builds a layer it does not own. A partition that leaves
a stage without layers is refused with the numbers that cause it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime import utils as ds_utils
from torch import nn

from bigtrain.errors import ConfigError
from bigtrain.models import TransformerLM
from bigtrain.parallel.layout import Layout
from bigtrain.parallel.pipeline import layer_specs


def stage_boundaries(specs: list, stages: int, method: str) -> list[int]:
    """DeepSpeed's partition of `specs` into `stages`: layer indices [b_0 = 0, b_1, ..., b_stages = len]."""
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(specs), num_parts=stages)
    if method == "parameters":
        return ds_utils.partition_balanced(weights=[s.n_params for s in specs], num_parts=stages)
    if method.startswith("type:"):
        import re

        pattern = re.compile(method[len("type:"):], re.IGNORECASE)
        weights = [1 if pattern.search(getattr(s, "typename", type(s)).__name__) else 0 for s in specs]
        return ds_utils.partition_balanced(weights=weights, num_parts=stages)
    raise ConfigError(f"parallel.partition_method={method!r} is not known; use 'parameters', 'uniform' or "
                      f"'type:<regex of a layer class>' (e.g. 'type:BlockPipe').")


def check_stages(specs: list, stages: int, method: str) -> list[int]:
    bounds = stage_boundaries(specs, stages, method)
    sizes = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if any(size == 0 for size in sizes):
        raise ConfigError(
            f"parallel.pipeline={stages} with parallel.partition_method={method!r} leaves a stage without "
            f"layers (layers per stage: {sizes}; the model has {len(specs)} pipeline layers: embedding, blocks, "
            f"norm(s), head). Use fewer stages, more model.n_layers, or partition_method=uniform.")
    return bounds


class BigtrainPipelineModule(PipelineModule):
    """PipelineModule that counts parameters on the meta model and refuses empty stages."""

    def _count_layer_params(self) -> list[int]:
        return [s.n_params for s in self._layer_specs]

    def _partition_layers(self, method: str = "uniform") -> None:
        check_stages(self._layer_specs, self.num_stages, method)
        super()._partition_layers(method)

    def _synchronize_tied_weights(self) -> None:
        # DeepSpeed broadcasts into the parameters themselves; outside no_grad autograd records the in-place
        # collective on the leaf (and warns at every backward).
        with torch.no_grad():
            super()._synchronize_tied_weights()


def build_pipeline_module(model: TransformerLM, layout: Layout, partition_method: str,
                          materialize: Callable[[nn.Module], None], loss_fn: Callable) -> BigtrainPipelineModule:
    """This rank's stage of `model` (on the meta device; `materialize` allocates and initializes a piece)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)
    return BigtrainPipelineModule(layer_specs(model, materialize), topology=topology, loss_fn=loss_fn,
                                  partition_method=partition_method, dynamic_shape=model.family != "causal")
