"""The parallel layout: how the world's ranks split into tensor, data and pipeline groups.

Ranks are numbered in Megatron's order, tensor innermost, then data, then pipeline:

    rank = pipe · (D · T) + data · T + tensor

which is the order of DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model), so the
pipeline engine sees the same coordinates. Tensor groups are consecutive ranks (one node, fast links);
data groups hold the replicas of one model shard; pipeline groups the stages of one replica.

`Layout` is pure arithmetic (checked at config load, no process group needed); `ParallelGroups` creates
the process groups once the job runs and answers DeepSpeed's `mpu` questions. Nothing is module-global:
the trainer passes the one `ParallelGroups` object to whatever needs a group.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigtrain.errors import ConfigError


@dataclass(frozen=True)
class Coordinates:
    pipe: int
    data: int
    tensor: int


@dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @classmethod
    def for_world(cls, tensor: int, pipeline: int, world_size: int, data: int | None = None) -> Layout:
        """The layout of `world_size` ranks; data = world / (tensor · pipeline) unless given (then checked)."""
        for name, value in (("parallel.tensor", tensor), ("parallel.pipeline", pipeline)):
            if value < 1:
                raise ConfigError(f"Config key '{name}' must be positive, got {value}.")
        model_parallel = tensor * pipeline
        if world_size % model_parallel:
            raise ConfigError(f"parallel.tensor ({tensor}) * parallel.pipeline ({pipeline}) = {model_parallel} "
                              f"does not divide the world size {world_size}. Choose sizes whose product divides "
                              f"it (the remaining factor is the data-parallel size).")
        dp = world_size // model_parallel
        if data is not None and data != dp:
            raise ConfigError(f"parallel.data={data} but world size {world_size} / (tensor {tensor} * pipeline "
                              f"{pipeline}) = {dp}. Set parallel.data={dp} or leave it null.")
        return cls(tensor=tensor, pipeline=pipeline, data=dp)

    # ---- rank arithmetic ----------------------------------------------------------------------------
    def coordinates(self, rank: int) -> Coordinates:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        return Coordinates(pipe=rank // (self.data * self.tensor), data=rank // self.tensor % self.data,
                           tensor=rank % self.tensor)

    def rank_of(self, pipe: int, data: int, tensor: int) -> int:
        return pipe * self.data * self.tensor + data * self.tensor + tensor

    def tensor_groups(self) -> list[list[int]]:
        """Ranks that hold the shards of one set of layers (same pipe and data coordinates)."""
        return [[self.rank_of(p, d, t) for t in range(self.tensor)]
                for p in range(self.pipeline) for d in range(self.data)]

    def data_groups(self) -> list[list[int]]:
        """Ranks that hold the same shard and average their gradients (same pipe and tensor coordinates)."""
        return [[self.rank_of(p, d, t) for d in range(self.data)]
                for p in range(self.pipeline) for t in range(self.tensor)]

    def pipeline_groups(self) -> list[list[int]]:
        """The stages of one replica (same data and tensor coordinates)."""
        return [[self.rank_of(p, d, t) for p in range(self.pipeline)]
                for d in range(self.data) for t in range(self.tensor)]

    def model_groups(self) -> list[list[int]]:
        """All ranks that together hold one whole replica (tensor × pipeline, same data coordinate)."""
        return [[self.rank_of(p, d, t) for p in range(self.pipeline) for t in range(self.tensor)]
                for d in range(self.data)]

    def seed_offset(self, rank: int) -> int:
        """Offset of the default RNG seed: equal across tensor ranks (replicated regions draw the same
        dropout masks there), distinct across data replicas and pipeline stages."""
        c = self.coordinates(rank)
        return c.pipe * self.data + c.data

    def describe(self) -> str:
        return f"tensor {self.tensor} × pipeline {self.pipeline} × data {self.data} = {self.world_size} ranks"


class ParallelGroups:
    """The process groups of a `Layout` for one rank, plus the `mpu` interface DeepSpeed expects.

    Every rank must construct this at the same point (torch creates groups collectively, in the same order
    on all ranks). "Model parallel" in DeepSpeed's sense is tensor × pipeline: its gradient-norm code counts
    replicated parameters on model-parallel rank 0 and sums over that group.
    """

    def __init__(self, layout: Layout, rank: int) -> None:
        import torch.distributed as dist

        self.layout, self.rank = layout, rank
        self.coords = layout.coordinates(rank)
        self._groups: dict[str, tuple[object, list[int]]] = {}
        for kind, all_ranks in (("tensor", layout.tensor_groups()), ("data", layout.data_groups()),
                                ("pipeline", layout.pipeline_groups()), ("model", layout.model_groups())):
            for ranks in all_ranks:
                group = dist.new_group(ranks=ranks)  # collective: every rank creates every group
                if rank in ranks:
                    self._groups[kind] = (group, ranks)
        # Connect every group now (kinds in the same order on all ranks; groups of one kind are disjoint):
        # a lazily connected group would leave a survivor waiting for a dead peer instead of failing fast.
        for kind in ("tensor", "data", "pipeline", "model"):
            dist.barrier(group=self.group(kind))

    def group(self, kind: str):
        return self._groups[kind][0]

    def ranks(self, kind: str) -> list[int]:
        return self._groups[kind][1]

    @property
    def tensor_group(self):
        return self.group("tensor")

    @property
    def data_group(self):
        return self.group("data")

    # ---- DeepSpeed's mpu interface --------------------------------------------------------------------
    def get_tensor_model_parallel_group(self):
        return self.group("tensor")

    def get_tensor_model_parallel_rank(self) -> int:
        return self.coords.tensor

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tensor

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ranks("tensor")[0]

    def get_pipeline_model_parallel_group(self):
        return self.group("pipeline")

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.coords.pipe

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pipeline

    def get_model_parallel_group(self):
        return self.group("model")

    def get_model_parallel_rank(self) -> int:
        return self.ranks("model").index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tensor * self.layout.pipeline

    def get_data_parallel_group(self):
        return self.group("data")

    def get_data_parallel_rank(self) -> int:
        return self.coords.data

    def get_data_parallel_world_size(self) -> int:
        return self.layout.data

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.ranks("data"))
