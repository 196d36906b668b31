"""Every process group of a run: those of its `Layout` (tensor, data, pipeline, model), their host (gloo) twins
for values that live on the host, and DeepSpeed's `mpu` interface.

Built once per job, after the default process group exists, and passed explicitly to everything that needs a
group: nothing here or elsewhere is module-global, and no other module creates a group.

    tensor, data, pipeline, model   the layout's groups, on the default backend (nccl on GPUs, gloo on CPUs)
    context, gradient               with parallel.context > 1 only: the ranks sharing one sequence, and the
                                    ranks whose gradients are summed (data × context); created only then, so a
                                    run without context parallelism makes the same groups as before
    expert, expert_data             with parallel.expert > 1 only: the EP data ranks that split the routed
                                    experts (tokens cross them by all-to-all), and the D / EP data ranks that
                                    hold the same experts (expert gradients are summed over them)
    host_data                       the data group for host tensors (token counts): the data group itself on
                                    CPUs, a gloo twin of it on GPUs, so that summing host numbers never waits for
                                    the device (and never hands NCCL a CPU tensor)
    host_world                      every rank, gloo: stop signals, checkpoint barriers (None on CPUs: the default
                                    group is gloo already)
    long_wait                       every rank, gloo, a timeout of days: ranks waiting for rank 0 to prepare a
                                    corpus, which may take longer than parallel.collective_timeout
"""

from __future__ import annotations

from datetime import timedelta

from bigtrain.config.layout import Layout

LONG_WAIT = timedelta(days=2)
KINDS = ("tensor", "data", "pipeline", "model")
CONTEXT_KINDS = ("context", "gradient")
EXPERT_KINDS = ("expert", "expert_data")


class ParallelGroups:
    """The process groups of a `Layout` for one rank, plus the `mpu` interface DeepSpeed expects.

    Every rank must construct this at the same point (torch creates groups collectively, in the same order
    on all ranks). "Model parallel" in DeepSpeed's sense is tensor × pipeline: its gradient-norm code counts
    replicated parameters on model-parallel rank 0 and sums over that group.
    """

    def __init__(self, layout: Layout, rank: int, timeout_s: float | None = None, on_gpu: bool = False) -> None:
        """`timeout_s`: how long a collective of these groups may wait (parallel.collective_timeout); `on_gpu`:
        the default backend is nccl, so host values get gloo twins."""
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        self.layout, self.rank = layout, rank
        self.coords = layout.coordinates(rank)
        self._groups: dict[str, tuple[object, list[int]]] = {}
        self.kinds = (KINDS + (CONTEXT_KINDS if layout.context > 1 else ())
                      + (EXPERT_KINDS if layout.expert > 1 else ()))
        layouts = (layout.tensor_groups(), layout.data_groups(), layout.pipeline_groups(), layout.model_groups())
        if layout.context > 1:
            layouts += (layout.context_groups(), layout.gradient_groups())
        if layout.expert > 1:
            layouts += (layout.expert_groups(), layout.expert_data_groups())
        for kind, all_ranks in zip(self.kinds, layouts, strict=True):
            for ranks in all_ranks:
                group = dist.new_group(ranks=ranks, timeout=timeout)  # collective: every rank creates all
                if rank in ranks:
                    self._groups[kind] = (group, ranks)
        # Connect every group now (kinds in the same order on all ranks; groups of one kind are disjoint):
        # a lazily connected group would leave a survivor waiting for a dead peer instead of failing fast.
        for kind in self.kinds:
            dist.barrier(group=self.group(kind))
        self.host_data = self.data_group
        self.host_world = None
        if on_gpu:
            for ranks in layout.data_groups():
                group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
                if rank in ranks:
                    self.host_data = group
            self.host_world = dist.new_group(backend="gloo", timeout=timeout)
        self.long_wait = dist.new_group(backend="gloo", timeout=LONG_WAIT)

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

    @property
    def context_group(self):
        """The ranks holding 1/C each of the same sequences (None without context parallelism)."""
        return self.group("context") if self.layout.context > 1 else None

    @property
    def expert_group(self):
        """The ranks splitting the routed experts among them (None without expert parallelism)."""
        return self.group("expert") if self.layout.expert > 1 else None

    @property
    def expert_data_group(self):
        """The ranks holding the same experts: the data group without expert parallelism."""
        return self.group("expert_data") if self.layout.expert > 1 else self.group("data")

    @property
    def expert_rank(self) -> int:
        """This rank's index in its expert group (0 without expert parallelism)."""
        return self.ranks("expert").index(self.rank) if self.layout.expert > 1 else 0

    @property
    def expert_data_rank(self) -> int:
        """This rank's index in its expert-data group (its data-parallel rank without expert parallelism)."""
        return self.ranks("expert_data").index(self.rank) if self.layout.expert > 1 else self.coords.data

    @property
    def gradient_group(self):
        """The ranks whose gradients are summed: data × context (the data group without context parallelism)."""
        return self.group("gradient") if self.layout.context > 1 else self.group("data")

    @property
    def gradient_rank(self) -> int:
        """This rank's index in the gradient group (its data-parallel rank without context parallelism): the
        rank that owns a ZeRO / FSDP partition of the state, and 0 on the one rank that writes replicated state."""
        return self.ranks("gradient").index(self.rank) if self.layout.context > 1 else self.coords.data

    # ---- host values -----------------------------------------------------------------------------------
    def sum_on_host(self, values: tuple[int, ...]) -> list[int]:
        """Σ over the data-parallel ranks of small host integers, on the host data group (nothing touches a
        device)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, group=self.host_data)
        return t.tolist()

    def max_on_host(self, values: list[float]) -> list[float]:
        """Each host number's maximum over every rank of the world, on the host world group (gloo; nothing
        touches a device)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_world)
        return t.tolist()

    def host_barrier(self) -> None:
        """Every rank of the world arrives here, on a host group."""
        import torch.distributed as dist

        dist.barrier(group=self.host_world)

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


class GradientMpu:
    """DeepSpeed's `mpu` under context parallelism: `groups` with the data-parallel group widened to the gradient
    group (data × context). DeepSpeed then averages gradients, and partitions ZeRO state, over the D·C ranks that
    hold the same weights; its model-parallel group (tensor × pipeline) is unchanged, so its gradient norm still
    counts each weight once."""

    def __init__(self, groups: ParallelGroups) -> None:
        self._groups = groups

    def __getattr__(self, name: str):
        return getattr(self._groups, name)

    def get_data_parallel_group(self):
        return self._groups.gradient_group

    def get_data_parallel_rank(self) -> int:
        return self._groups.gradient_rank

    def get_data_parallel_world_size(self) -> int:
        return self._groups.layout.data * self._groups.layout.context

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._groups.ranks("gradient"))
