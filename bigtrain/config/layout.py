"""The resolved layout of a run: how its ranks split, and what runs on them, decided once.

`resolve_layout(cfg, world_size)` is the one place where the config and the world size become a `Layout`:

    tensor × context × pipeline × data = world  data = world / (tensor · context · pipeline) unless parallel.data
                                              says it; context C: each rank holds 1/C of every sequence
    sequence_parallel                         norms and residual dropout on sequence shards (tensor > 1)
    expert                                    parallel.expert EP: groups of EP data ranks split the routed experts
                                              (EP divides data; checked with model.moe at load)
    zero_stage                                0 under the plain engine, else parallel.zero_stage
    engine                                    the engine that runs the steps (`ENGINES`); parallel.engine=auto
                                              resolves here and nowhere else: DeepSpeed when several ranks run
                                              or ZeRO is asked for, its pipeline engine when there are stages;
                                              parallel.engine=torch is the plain engine on one process and
                                              PyTorch's FSDP2 (`fsdp2`) on several, its pipeline
                                              schedules (`torch_pipeline`) with pipeline stages
    precision                                 fp32 | bf16 | fp16 (train.precision=fp8 is bf16 here: everything
                                              but the blocks' FP8 matmuls runs as under bf16, docs/fp8.md)

The command computes it once and passes it down (process groups, the engine, the checkpoint that records it);
nothing else reads parallel.engine. Ranks are numbered in Megatron's order, tensor innermost, then context, then
data, then pipeline:

    rank = ((pipe · D + data) · C + context) · T + tensor

which with C = 1 is the order of DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model), so the
pipeline engine sees the same coordinates. Context groups are the next-nearest ranks after the tensor group (the
ring's sends stay within a node when T · C fits one); gradients are summed over data × context
(`gradient_groups`), since context ranks hold the same weights but different tokens.
Tensor groups are consecutive ranks (one node, fast links); data groups hold
the replicas of one model shard; pipeline groups the stages of one replica. Expert parallelism carves the data
group into groups of EP consecutive data coordinates (an expert group: each holds E / EP experts of every MoE
block), and the data ranks with the same position in their expert group form an expert-data group (D / EP ranks
holding the same experts, over which expert gradients are summed):

    expert group of data coordinate d       d − d mod EP, ..., d − d mod EP + EP − 1
    expert-data group of d                  d mod EP, d mod EP + EP, ..., D − EP + d mod EP

This module is pure arithmetic;
`bigtrain.distributed.groups.ParallelGroups` creates the groups once the job runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bigtrain.config.schema import Config
from bigtrain.errors import ConfigError

# The engines a layout can name: the plain PyTorch loop (one process), DeepSpeed data parallelism / ZeRO,
# DeepSpeed's pipeline engine, fairscale's sharded data parallelism, PyTorch's FSDP2 (parallel.engine=torch on
# several ranks) and PyTorch's pipeline schedules (parallel.engine=torch with pipeline stages).
ENGINES = ("torch", "deepspeed", "pipeline", "fairscale", "fsdp2", "torch_pipeline")
ENGINE_NAMES = {"torch": "the plain PyTorch engine", "deepspeed": "DeepSpeed", "pipeline": "DeepSpeed's pipeline "
                "engine", "fairscale": "fairscale", "fsdp2": "PyTorch's FSDP2",
                "torch_pipeline": "PyTorch's pipeline schedules"}


@dataclass(frozen=True)
class Coordinates:
    pipe: int
    data: int
    tensor: int
    context: int = 0


@dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    context: int = 1
    expert: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0
    engine: str = "torch"
    precision: str = "fp32"

    @property
    def world_size(self) -> int:
        return self.tensor * self.context * self.pipeline * self.data

    @property
    def distributed(self) -> bool:
        """Whether the run starts process groups (every engine but the plain one)."""
        return self.engine != "torch"

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed runs the steps (its data-parallel or its pipeline engine)."""
        return self.engine in ("deepspeed", "pipeline")

    @classmethod
    def for_world(cls, tensor: int, pipeline: int, world_size: int, data: int | None = None, context: int = 1,
                  expert: int = 1, **rest: Any) -> Layout:
        """The layout of `world_size` ranks; data = world / (tensor · context · pipeline) unless given (then
        checked); the expert size must divide data."""
        for name, value in (("parallel.tensor", tensor), ("parallel.pipeline", pipeline),
                            ("parallel.context", context), ("parallel.expert", expert)):
            if value < 1:
                raise ConfigError(f"Config key '{name}' must be positive, got {value}.")
        model_parallel = tensor * context * pipeline
        ctx = f" * parallel.context ({context})" if context > 1 else ""
        if world_size % model_parallel:
            raise ConfigError(f"parallel.tensor ({tensor}){ctx} * parallel.pipeline ({pipeline}) = {model_parallel} "
                              f"does not divide the world size {world_size}. Choose sizes whose product divides "
                              f"it (the remaining factor is the data-parallel size).")
        dp = world_size // model_parallel
        if data is not None and data != dp:
            ctx = f" * context {context}" if context > 1 else ""
            raise ConfigError(f"parallel.data={data} but world size {world_size} / (tensor {tensor}{ctx} * pipeline "
                              f"{pipeline}) = {dp}. Set parallel.data={dp} or leave it null.")
        if dp % expert:
            raise ConfigError(f"parallel.expert={expert} does not divide the data-parallel size {dp} (world size "
                              f"{world_size} / (tensor {tensor} * context {context} * pipeline {pipeline})): expert "
                              f"groups are carved out of the data-parallel ranks. Choose parallel.expert among the "
                              f"divisors of {dp}.")
        return cls(tensor=tensor, pipeline=pipeline, data=dp, context=context, expert=expert, **rest)

    # ---- what a checkpoint records ------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The layout as plain data (a checkpoint's index records the layout that wrote it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Layout:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    def describe(self) -> str:
        """How the ranks split: 'tensor 2 × pipeline 1 × data 2 = 4 ranks' (with 'context C × ' after the tensor
        size under context parallelism)."""
        ctx = f"context {self.context} × " if self.context > 1 else ""
        ep = f" (expert {self.expert})" if self.expert > 1 else ""
        return (f"tensor {self.tensor} × {ctx}pipeline {self.pipeline} × data {self.data}{ep} = {self.world_size} "
                f"ranks")

    def describe_run(self) -> str:
        """The split, the engine and the precision, as resume messages name a layout."""
        sp = " + sequence parallel" if self.sequence_parallel else ""
        zero = f", ZeRO-{self.zero_stage}" if self.engine != "torch" else ""
        ctx = f" × context {self.context}" if self.context > 1 else ""
        ep = f" (expert {self.expert})" if self.expert > 1 else ""
        return (f"tensor {self.tensor}{sp}{ctx} × pipeline {self.pipeline} × data {self.data}{ep}{zero}, "
                f"{ENGINE_NAMES[self.engine]}, {self.precision}")

    # ---- rank arithmetic ----------------------------------------------------------------------------
    def coordinates(self, rank: int) -> Coordinates:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        tc = self.tensor * self.context
        return Coordinates(pipe=rank // (self.data * tc), data=rank // tc % self.data, tensor=rank % self.tensor,
                           context=rank // self.tensor % self.context)

    def rank_of(self, pipe: int, data: int, tensor: int, context: int = 0) -> int:
        """rank = ((pipe · D + data) · C + context) · T + tensor."""
        return ((pipe * self.data + data) * self.context + context) * self.tensor + tensor

    def tensor_groups(self) -> list[list[int]]:
        """Ranks that hold the shards of one set of layers (same pipe, data and context coordinates)."""
        return [[self.rank_of(p, d, t, c) for t in range(self.tensor)]
                for p in range(self.pipeline) for d in range(self.data) for c in range(self.context)]

    def context_groups(self) -> list[list[int]]:
        """Ranks that each hold 1/C of the same sequences (same pipe, data and tensor coordinates)."""
        return [[self.rank_of(p, d, t, c) for c in range(self.context)]
                for p in range(self.pipeline) for d in range(self.data) for t in range(self.tensor)]

    def data_groups(self) -> list[list[int]]:
        """Ranks that hold the same shard and read different samples (same pipe, tensor and context
        coordinates)."""
        return [[self.rank_of(p, d, t, c) for d in range(self.data)]
                for p in range(self.pipeline) for c in range(self.context) for t in range(self.tensor)]

    def expert_groups(self) -> list[list[int]]:
        """Ranks that split the routed experts of every MoE block among them: EP consecutive data coordinates
        (same pipe, tensor and context coordinates); tokens travel between them by all-to-all."""
        ep = self.expert
        return [[self.rank_of(p, g * ep + i, t, c) for i in range(ep)]
                for p in range(self.pipeline) for c in range(self.context) for t in range(self.tensor)
                for g in range(self.data // ep)]

    def expert_data_groups(self) -> list[list[int]]:
        """Ranks that hold the same experts and read different samples (data coordinates equal modulo EP; same
        pipe, tensor and context coordinates): expert gradients are summed over these."""
        ep = self.expert
        return [[self.rank_of(p, d, t, c) for d in range(i, self.data, ep)]
                for p in range(self.pipeline) for c in range(self.context) for t in range(self.tensor)
                for i in range(ep)]

    def gradient_groups(self) -> list[list[int]]:
        """Ranks whose gradients are summed (data × context, same pipe and tensor coordinates): context ranks
        act as extra data ranks for the reduction although they read the same samples."""
        return [[self.rank_of(p, d, t, c) for d in range(self.data) for c in range(self.context)]
                for p in range(self.pipeline) for t in range(self.tensor)]

    def pipeline_groups(self) -> list[list[int]]:
        """The stages of one replica (same data, context and tensor coordinates)."""
        return [[self.rank_of(p, d, t, c) for p in range(self.pipeline)]
                for d in range(self.data) for c in range(self.context) for t in range(self.tensor)]

    def model_groups(self) -> list[list[int]]:
        """All ranks that together hold one whole replica's weights (tensor × pipeline, same data and context
        coordinates; context ranks hold whole copies, so DeepSpeed's gradient norm must not sum over them)."""
        return [[self.rank_of(p, d, t, c) for p in range(self.pipeline) for t in range(self.tensor)]
                for d in range(self.data) for c in range(self.context)]

    def seed_offset(self, rank: int) -> int:
        """Offset of the default RNG seed: equal across tensor ranks (replicated regions draw the same
        dropout masks there), distinct across data replicas, pipeline stages and context ranks (which hold
        different tokens); without context parallelism pipe · D + data."""
        c = self.coordinates(rank)
        return (c.pipe * self.data + c.data) * self.context + c.context


def engine_for(requested: str, world_size: int, zero_stage: int, pipeline: int) -> str:
    """parallel.engine (`requested`) as the engine that runs: auto picks DeepSpeed when several ranks run or
    ZeRO is asked for, else the plain engine; DeepSpeed with pipeline stages is its pipeline engine; torch is the
    plain engine on one process, FSDP2 on several, and torch.distributed.pipelining's schedules with pipeline
    stages."""
    if requested == "fairscale":
        return "fairscale"
    if requested == "torch":
        if world_size == 1:
            return "torch"
        return "torch_pipeline" if pipeline > 1 else "fsdp2"
    if requested == "auto" and world_size == 1 and zero_stage == 0:
        return "torch"
    return "pipeline" if pipeline > 1 else "deepspeed"


def resolve_engine(cfg: Config, world_size: int) -> str:
    p = cfg.parallel
    return engine_for(p.engine, world_size, p.zero_stage, p.pipeline)


def compute_precision(precision: str) -> str:
    """The precision engines run in: fp8's FP8 matmuls are a layer conversion (`bigtrain.parallel.fp8`), and the
    rest of the model, the engines' mixed precision and the optimizer run as under bf16."""
    return "bf16" if precision == "fp8" else precision


def resolve_layout(cfg: Config, world_size: int) -> Layout:
    """The layout of `cfg` on `world_size` ranks (see the module docstring); ConfigError when the sizes do not
    divide the world."""
    p = cfg.parallel
    engine = resolve_engine(cfg, world_size)
    return Layout.for_world(p.tensor, p.pipeline, world_size, p.data, sequence_parallel=p.sequence_parallel,
                            context=p.context, expert=p.expert,
                            zero_stage=p.zero_stage if engine != "torch" else 0, engine=engine,
                            precision=compute_precision(cfg.train.precision))
