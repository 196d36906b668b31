"""The process groups of one `Layout` (tensor, data, pipeline, model) and DeepSpeed's `mpu` interface.

Built once per job, after the default process group exists, and passed explicitly to everything that needs a
group: nothing here or elsewhere is module-global.
"""

from __future__ import annotations

from bigtrain.config.layout import Layout


class ParallelGroups:
    """The process groups of a `Layout` for one rank, plus the `mpu` interface DeepSpeed expects.

    Every rank must construct this at the same point (torch creates groups collectively, in the same order
    on all ranks). "Model parallel" in DeepSpeed's sense is tensor × pipeline: its gradient-norm code counts
    replicated parameters on model-parallel rank 0 and sums over that group.
    """

    def __init__(self, layout: Layout, rank: int, timeout_s: float | None = None) -> None:
        """`timeout_s`: how long a collective of these groups may wait (parallel.collective_timeout)."""
        from datetime import timedelta

        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        self.layout, self.rank = layout, rank
        self.coords = layout.coordinates(rank)
        self._groups: dict[str, tuple[object, list[int]]] = {}
        for kind, all_ranks in (("tensor", layout.tensor_groups()), ("data", layout.data_groups()),
                                ("pipeline", layout.pipeline_groups()), ("model", layout.model_groups())):
            for ranks in all_ranks:
                group = dist.new_group(ranks=ranks, timeout=timeout)  # collective: every rank creates all
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
