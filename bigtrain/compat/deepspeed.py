"""Every use of DeepSpeed internals, in one place.

bigtrain drives DeepSpeed through its public API (`deepspeed.initialize`, the engine's `backward` / `step` /
`save_checkpoint` / `load_checkpoint`, `PipelineModule` with `LayerSpec` / `TiedLayerSpec`, the config dict),
plus the private pieces listed in `INTERNALS`: attributes of its ZeRO and bf16 optimizers (to label ZeRO
partitions for exact LAMB and to measure memory), attributes it sets on parameters, three private methods of
`PipelineModule`, and its checkpoint file names. Any DeepSpeed release may change them: pyproject.toml pins the
minor range they were checked against, and `missing_internals()` (tests/test_compat.py) names every one the
installed DeepSpeed lacks, so an upgrade fails here, in one named place, rather than deep inside a run.

Importing this module does not import DeepSpeed; the functions below do, when called.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bigtrain.compat.deepspeed_import import import_deepspeed
from bigtrain.errors import CheckpointError

TESTED = "0.19"  # the DeepSpeed minor release these internals were read from (pyproject: >=0.19,<0.20)


@dataclass(frozen=True)
class Internal:
    """One private piece of DeepSpeed that bigtrain uses.

    kind: `method` / `function` (exists on the class / module), `instance` (an attribute the class's code
    assigns to `self`), `parameter` (an attribute the module's code sets on parameters), `argument` (a keyword
    of the method `owner.name`, given as `name:argument`), `text` (a piece of a file name the module's code
    writes), `class` (a class the module defines; instances are pickled into its checkpoints), `field` (a field
    of the dataclass `owner`).
    """

    module: str
    owner: str
    name: str
    kind: Literal["method", "function", "instance", "parameter", "argument", "text", "class", "field"]
    why: str

    def present(self) -> bool:
        module = importlib.import_module(self.module)
        if self.kind in ("function", "class"):
            return hasattr(module, self.name)
        if self.kind == "parameter":
            return re.search(rf"\.{self.name}\s*=", inspect.getsource(module)) is not None
        if self.kind == "text":
            return self.name in inspect.getsource(module)
        cls = getattr(module, self.owner, None)
        if cls is None:
            return False
        if self.kind == "method":
            return callable(getattr(cls, self.name, None))
        if self.kind == "field":
            return self.name in getattr(cls, "__dataclass_fields__", {})
        sources = [inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("deepspeed")]
        if self.kind == "argument":  # read from the source: decorators hide the signature
            method, argument = self.name.split(":")
            pattern = re.compile(rf"def {method}\(([^)]*)\)")
            return any(argument in m.group(1) for source in sources for m in pattern.finditer(source))
        pattern = re.compile(rf"\bself\.{self.name}\b\s*(:[^=\n]*)?=[^=]")
        return any(pattern.search(source) for source in sources)

    def describe(self) -> str:
        where = f"{self.module}.{self.owner}" if self.owner else self.module
        return f"{where}: {self.kind} '{self.name}' ({self.why})"


_ZERO12 = "deepspeed.runtime.zero.stage_1_and_2"
_ZERO3 = "deepspeed.runtime.zero.stage3"
_BF16 = "deepspeed.runtime.bf16_optimizer"
_PIPE = "deepspeed.runtime.pipe.module"
INTERNALS: tuple[Internal, ...] = (
    *(Internal(_ZERO12, "DeepSpeedZeroOptimizer", name, "instance", "exact LAMB labels ZeRO-1/2 flat partitions")
      for name in ("single_partition_of_fp32_groups", "partition_size", "round_robin_bit16_offsets",
                   "round_robin_bit16_meta", "round_robin_bit16_groups")),
    Internal(_ZERO12, "DeepSpeedZeroOptimizer", "averaged_gradients", "instance", "gradient memory"),
    Internal(_ZERO12, "DeepSpeedZeroOptimizer", "grads_in_partition", "instance", "gradient memory"),
    Internal(_ZERO3, "DeepSpeedZeroOptimizer_Stage3", "fp32_partitioned_groups_flat", "instance", "master memory"),
    Internal(_ZERO3, "DeepSpeedZeroOptimizer_Stage3", "grad_partitions_flat_buffer", "instance", "gradient memory"),
    Internal(_BF16, "BF16_Optimizer", "fp32_groups_flat_partition", "instance", "master memory"),
    Internal(_BF16, "BF16_Optimizer", "fp32_groups_gradients_flat", "instance", "gradient memory"),
    Internal("deepspeed.runtime.zero.partition_parameters", "", "ds_tensor", "parameter",
             "a ZeRO-3 parameter's local partition (memory)"),
    Internal(_PIPE, "", "ds_pipe_replicated", "parameter", "tied copies on later stages, counted once in norms"),
    Internal(_PIPE, "PipelineModule", "_count_layer_params", "method", "count parameters on the meta model"),
    Internal(_PIPE, "PipelineModule", "_partition_layers", "method", "refuse empty pipeline stages first"),
    Internal(_PIPE, "PipelineModule", "_synchronize_tied_weights", "method", "broadcast tied weights without autograd"),
    Internal(_PIPE, "PipelineModule", "_layer_specs", "instance", "the layer specs being partitioned"),
    Internal("deepspeed.runtime.pipe.engine", "PipelineEngine", "total_loss", "instance",
             "reset before evaluation, which would add onto the last training loss"),
    Internal("deepspeed.runtime.engine", "DeepSpeedEngine", "backward:scale_wrt_gas", "argument",
             "bigtrain scales each micro-batch's loss itself"),
    Internal("deepspeed.runtime.utils", "", "partition_uniform", "function", "pipeline stage boundaries"),
    Internal("deepspeed.runtime.utils", "", "partition_balanced", "function", "pipeline stage boundaries"),
    Internal("deepspeed.utils.zero_to_fp32", "", "get_fp32_state_dict_from_zero_checkpoint", "function",
             "consolidate ZeRO checkpoints"),
    Internal("deepspeed.runtime.engine", "", "_model_states.pt", "text", "checkpoint files: mp_rank_XX_model_states"),
    Internal("deepspeed.runtime.engine", "", "_optim_states.pt", "text", "checkpoint files: ZeRO optimizer states"),
    Internal(_PIPE, "", "-model_states.pt", "text", "checkpoint files: layer_XX-model_states of a pipeline"),
    Internal("deepspeed.runtime.engine", "DeepSpeedEngine", "checkpoint_engine", "instance",
             "asynchronous checkpoints: the files DeepSpeed saves go to host memory first"),
    Internal("deepspeed.utils.mixed_precision_linkage", "", "_hp_mapping", "parameter",
             "where a parameter's fp32 fragment lives (layout-free checkpoints)"),
    *(Internal("deepspeed.utils.tensor_fragment", "tensor_fragment", name, "field", "layout-free checkpoints")
      for name in ("lp_fragment_address", "hp_fragment_address", "param_group_index")),
    Internal("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "grad_position", "instance",
             "where a ZeRO-3 parameter's partition lives in its flat group (layout-free checkpoints)"),
    Internal("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "get_param_id", "method",
             "layout-free checkpoints"),
    Internal("deepspeed.runtime.zero.partition_parameters", "", "ds_numel", "parameter",
             "a ZeRO-3 parameter's size"),
    Internal("deepspeed.runtime.zero.partition_parameters", "", "ds_shape", "parameter",
             "a ZeRO-3 parameter's shape"),
    *(Internal(module, "", name, "class", "pickled into checkpoints; rebuilt by the weights-only loader")
      for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                           ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                           ("deepspeed.utils.tensor_fragment", "fragment_address"))),
)


def missing_internals() -> list[str]:
    """The internals in `INTERNALS` that the installed DeepSpeed does not have (empty when all are there)."""
    return [item.describe() for item in INTERNALS if not item.present()]


# ---- ZeRO optimizers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroPartition:
    """One parameter group's flat fp32 partition on this rank (ZeRO-1/2): the group's parameters are laid end
    to end, padded, and cut into equal partitions of `size` elements; parameter j starts at `offsets[j]`."""

    flat: torch.Tensor
    size: int
    offsets: list[int]
    numels: list[int]
    params: list[torch.Tensor]


def take_gradient_reduction(engine: Any) -> None:
    """Stop DeepSpeed's engine from all-reducing gradients after the last backward of a step (ZeRO-0): the caller
    reduces them itself (expert parallelism reduces expert and other parameters over different groups). The pipeline
    engine keeps its own switch (its `enable_backward_allreduce` is always off)."""
    engine.enable_backward_allreduce = False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False


def has_zero_partitions(zero_optimizer: object) -> bool:
    return hasattr(zero_optimizer, "single_partition_of_fp32_groups")


def zero_partitions(zero_optimizer: Any) -> Iterator[ZeroPartition]:
    for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        yield ZeroPartition(flat=flat, size=zero_optimizer.partition_size[i],
                            offsets=list(zero_optimizer.round_robin_bit16_offsets[i]),
                            numels=[m.numel() for m in zero_optimizer.round_robin_bit16_meta[i]],
                            params=list(zero_optimizer.round_robin_bit16_groups[i]))


# Where DeepSpeed's optimizer wrappers keep fp32 master partitions and gradient partitions.
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
              "fp32_groups_gradients_flat")


def local_partition(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 partition, or the parameter itself."""
    return getattr(p, "ds_tensor", p)


def local_shape(p: torch.Tensor) -> torch.Size:
    """The shape of a parameter (of its tensor shard) on this rank, also under ZeRO-3 (whose parameters are
    empty placeholders between forwards)."""
    return getattr(p, "ds_shape", p.shape)


def is_tied_copy(p: torch.Tensor) -> bool:
    """A copy of a tied weight on a later pipeline stage (the first stage that holds it counts it): DeepSpeed's
    mark, or bigtrain's for PyTorch's pipeline schedules (`bigtrain.parallel.stages.mark_tied_copies`)."""
    return bool(getattr(p, "ds_pipe_replicated", False) or getattr(p, "tied_copy", False))


# ---- where a parameter's optimizer state lives (layout-free checkpoints) -------------------------------------
@dataclass(frozen=True)
class Fragment:
    """A parameter's share of a flat fp32 partition (ZeRO-1/2, bf16 optimizer): `numel` values that start at
    `param_start` of the flattened parameter and at `flat_start` of the partition of inner group `group`."""

    group: int
    flat_start: int
    param_start: int
    numel: int


def fragment_of(p: torch.Tensor) -> Fragment | None:
    """This rank's fragment of `p`, or None when its partition holds none of `p`."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    return Fragment(group=mapping.param_group_index, flat_start=mapping.hp_fragment_address.start,
                    param_start=mapping.lp_fragment_address.start, numel=mapping.lp_fragment_address.numel)


def inner_optimizer(wrapper: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a DeepSpeed ZeRO / bf16 optimizer (whose param groups hold flat partitions)."""
    return wrapper.optimizer


@dataclass(frozen=True)
class Partition:
    """A ZeRO-3 parameter's part on one data-parallel rank: `numel` real values (padding excluded) from
    `param_start` of the flattened parameter, at `flat_start` of the fp32 flat group `flat`."""

    flat: torch.Tensor
    flat_start: int
    param_start: int
    numel: int


class Zero3Layout:
    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def partition(self, p: torch.Tensor, data_rank: int) -> Partition:
        group, offset, partition_numel = self.wrapper.grad_position[self.wrapper.get_param_id(p)]
        start = data_rank * partition_numel
        numel = max(0, min(partition_numel, p.ds_numel - start))
        return Partition(self.wrapper.fp32_partitioned_groups_flat[group], offset, start, numel)


def zero3_layout(wrapper: Any) -> Zero3Layout | None:
    """ZeRO-3's partition bookkeeping, or None for any other optimizer."""
    is_zero3 = hasattr(wrapper, "grad_position") and hasattr(wrapper, "fp32_partitioned_groups_flat")
    return Zero3Layout(wrapper) if is_zero3 else None


# ---- pipeline --------------------------------------------------------------------------------------------
def reset_eval_loss(pipeline_engine: Any) -> None:
    """DeepSpeed adds evaluation outputs onto the last training loss unless this is cleared."""
    pipeline_engine.total_loss = None


def stage_boundaries(weights: list[int], stages: int, uniform: bool) -> list[int]:
    """DeepSpeed's partition into `stages`: [b_0 = 0, ..., b_stages = len(weights)]; `uniform` balances counts."""
    import_deepspeed()
    from deepspeed.runtime import utils as ds_utils

    if uniform:
        return ds_utils.partition_uniform(num_items=len(weights), num_parts=stages)
    return ds_utils.partition_balanced(weights=weights, num_parts=stages)


@functools.cache
def pipeline_module_class() -> type:
    """DeepSpeed's `PipelineModule` with three private methods overridden (built on first use):

    - parameter counts come from `spec.n_params` (counted on the meta model) instead of building every layer
      on every rank;
    - `check_partition(specs, stages, method)` runs before DeepSpeed partitions (it refuses empty stages);
    - tied weights are broadcast under no_grad (outside it autograd records the in-place collective on the
      leaf and warns at every backward).
    """
    import_deepspeed()
    from deepspeed.pipe import PipelineModule

    class CheckedPipelineModule(PipelineModule):
        def __init__(self, *args, check_partition: Callable[[list, int, str], object], **kwargs) -> None:
            self.check_partition = check_partition  # set first: PipelineModule.__init__ partitions
            super().__init__(*args, **kwargs)

        def _count_layer_params(self) -> list[int]:
            return [s.n_params for s in self._layer_specs]

        def _partition_layers(self, method: str = "uniform") -> None:
            self.check_partition(self._layer_specs, self.num_stages, method)
            super()._partition_layers(method)

        def _synchronize_tied_weights(self) -> None:
            with torch.no_grad():
                super()._synchronize_tied_weights()

    return CheckedPipelineModule


# ---- checkpoint files ------------------------------------------------------------------------------------
def checkpoint_classes() -> list[type]:
    """The plain data classes DeepSpeed pickles into its checkpoint files (a loss scaler's settings, the ZeRO
    stage enum, fragment addresses): what the weights-only loader may rebuild besides tensors."""
    return [getattr(importlib.import_module(item.module), item.name) for item in INTERNALS if item.kind == "class"]


def safe_checkpoint_loading():
    """A context in which DeepSpeed's own loads of its checkpoint files run code from none of them."""
    from bigtrain.compat.torch import weights_only_loading

    return weights_only_loading(checkpoint_classes())


class _FilesThrough:
    """DeepSpeed's checkpoint engine with its `save(state_dict, path)` sent to another function (all else as it
    was: directories, commit)."""

    def __init__(self, original: Any, save: Callable[..., None]) -> None:
        self._original, self._save = original, save

    def save(self, state_dict: Any, path: str) -> None:
        self._save(Path(path), state_dict, by_name=self._original.save)  # later written as DeepSpeed writes it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


@contextlib.contextmanager
def checkpoint_files_through(engine: Any, save: Callable[..., None] | None) -> Iterator[None]:
    """Within: every file DeepSpeed's `engine.save_checkpoint` writes through its checkpoint engine goes to
    `save(path, obj, by_name=DeepSpeed's own save)` (None: as DeepSpeed writes it). Its collectives and directories
    are unchanged; only the two recovery scripts rank 0 copies beside the ZeRO files bypass it (file copies)."""
    if save is None:
        yield
        return
    original = engine.checkpoint_engine
    if not getattr(original, "zipfile_serialization", True):
        raise CheckpointError("checkpoint.async writes DeepSpeed's files in torch's zip format; the DeepSpeed "
                              "config asks for the legacy one (checkpoint.checkpoint_serialization: false). Remove "
                              "that key, or set checkpoint.async=false.")
    engine.checkpoint_engine = _FilesThrough(original, save)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


def model_states_file(tensor_rank: int) -> str:
    """DeepSpeed's module file of one tensor rank (ZeRO-0/1/2; ZeRO-3 adds per-rank files)."""
    return f"mp_rank_{tensor_rank:02d}_model_states.pt"


def tensor_rank_files(tensor_rank: int) -> str:
    """Glob of every model/optimizer file of one tensor rank."""
    return f"*mp_rank_{tensor_rank:02d}_*states.pt"


def pipeline_layer_files(tensor: int, tensor_rank: int) -> str:
    """Glob of one tensor rank's per-layer files of a pipeline checkpoint."""
    return f"layer_*-model_{tensor_rank:02d}-model_states.pt" if tensor > 1 else "layer_*-model_states.pt"


def fp32_state_dict_from_zero(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The whole fp32 state dict that DeepSpeed's zero_to_fp32 reassembles from a ZeRO checkpoint."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


SHM_BUFFER_DIR = Path("/dev/shm")


def shm_buffer_path(rank: int, environ: Mapping[str, str] | None = None) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for `rank` (ops/csrc/cpu/comm/shm.cpp:
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, about 67 MB)."""
    env = os.environ if environ is None else environ
    return SHM_BUFFER_DIR / (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                             f"{env.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer once every rank has mapped it (call after a barrier that
    follows `deepspeed.init_distributed`): the mappings stay valid, and the segment no longer outlives the job
    (DeepSpeed never unlinks it, so each CPU run otherwise left ~67 MB per rank in /dev/shm for good)."""
    with contextlib.suppress(OSError):
        shm_buffer_path(rank).unlink()
