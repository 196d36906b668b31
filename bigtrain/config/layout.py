"""The parallel layout: how the world's ranks split into tensor, data and pipeline groups (pure arithmetic).

Ranks are numbered in Megatron's order, tensor innermost, then data, then pipeline:

    rank = pipe · (D · T) + data · T + tensor

which is the order of DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model), so the
pipeline engine sees the same coordinates. Tensor groups are consecutive ranks (one node, fast links);
data groups hold the replicas of one model shard; pipeline groups the stages of one replica.

`Layout` is checked at config load and needs no process group; `bigtrain.distributed.groups.ParallelGroups`
creates the groups once the job runs. Nothing is module-global: the trainer passes the one `ParallelGroups`
object to whatever needs a group.
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
