"""FSDP2 (`fully_shard`) around each pipeline stage of this rank: the third dimension of pipeline × tensor × data
(parallel.engine=torch, parallel.pipeline > 1, parallel.zero_stage 2 or 3).

    units      every block of a stage is its own unit (`fully_shard(BlockPipe)`), the stage module is the root unit
               of the rest (embedding, final norm, head, position bias); each stage, virtual stages included, is a
               root of its own, which is what torch.distributed.pipelining's schedules drive: they gather a stage
               (UNSHARD) before its first forward or backward in a window and free it (RESHARD) after, run every
               micro-batch's backward with `set_requires_gradient_sync(False)` (the unsharded gradients
               accumulate), and reduce-scatter once per step, after the stage's last backward (REDUCE_GRAD:
               `set_is_last_backward(True)`, then the units' `post_backward`)
    resharding zero_stage 3: `reshard_after_forward=True`; 2: `False` (kept gathered from forward to backward)
    sharding   dimension 0 of every parameter over the data group, as torch.chunk: data rank r holds rows
               [r·c, r·c + c), c = ⌈n/D⌉, one contiguous range of the flattened parameter (`LocalShard.start`)
    gradients  FSDP2 averages what it reduce-scatters (÷ D); the micro-batch losses are multiplied by D for the
               backward (`GlobalMeanLoss.backward_scale`), so a rank's rows are those of Σ_d ∇L_d = ∇L

A rank that holds two uses of the tied embedding in different stages of its own (DualPipeV's first and last stage,
or a seq2seq decoder's embedding on another stage of the first rank) would put one parameter in two roots; that is
refused (`check_tied_stages`).
"""

from __future__ import annotations

from bigtrain.compat.deepspeed import is_tied_copy
from bigtrain.compat.fsdp2 import data_mesh, fully_shard_api
from bigtrain.engine.fsdp2.sharding import LocalShard, local_shards
from bigtrain.errors import ConfigError
from bigtrain.parallel.pipeline import BlockPipe
from bigtrain.parallel.stages import RankStages, StageModule, model_parameters


def check_tied_stages(stages: RankStages) -> None:
    """Refuse (naming the keys) a rank whose stages share a parameter: one FSDP2 root per stage cannot hold it."""
    seen: dict[int, int] = {}
    for module, index in zip(stages.modules, stages.indices, strict=True):
        for p in module.parameters():
            if seen.setdefault(id(p), index) != index:
                raise ConfigError(
                    f"parallel.zero_stage=2/3 under parallel.engine=torch shards each pipeline stage as its own "
                    f"FSDP2 root, but pipeline rank {stages.rank} holds the tied embedding in stages "
                    f"{seen[id(p)]} and {index} (parallel.pipeline_schedule, model.tie_embeddings or the seq2seq "
                    f"decoder's embedding put two of its uses on one rank). Use parallel.zero_stage=0, "
                    f"model.tie_embeddings=false, or another parallel.pipeline_schedule / parallel.virtual_stages.")


def shard_stages(stages: list[StageModule], group: object, device_type: str, reshard_after_forward: bool,
                 bf16: bool) -> None:
    """Each block its own FSDP2 unit inside its stage's root unit; parameters are sharded in place."""
    import torch

    fully_shard, MixedPrecisionPolicy = fully_shard_api()
    mesh = data_mesh(group, device_type)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for stage in stages:
        for layer in stage.layers:
            if isinstance(layer, BlockPipe):
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        fully_shard(stage, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)


def stage_shards(stages: list[StageModule], group: object, device_type: str, zero_stage: int, bf16: bool,
                 tensor_parallel: set[str], data_rank: int, data_size: int) -> list[LocalShard]:
    """Shard `stages` (zero_stage 3: reshard after forward) and return this rank's rows of each of their
    parameters under the unsplit names, each once; the values carry the marks norms and checkpoints read:
    `tensor_model_parallel` (a tensor shard, `tensor_parallel` names), `tied_copy` (the embedding on a later
    pipeline rank) and `piece_name` (the unsplit name)."""
    before = model_parameters(stages)
    shapes = {name: p.shape for name, p in before.items()}
    tied = {name for name, p in before.items() if is_tied_copy(p)}
    shard_stages(stages, group, device_type, zero_stage == 3, bf16)
    shards = local_shards(model_parameters(stages).items(), shapes, lambda _: (data_rank, data_size))
    for s in shards:
        s.values.tensor_model_parallel = s.name in tensor_parallel
        s.values.tied_copy = s.name in tied
        s.values.piece_name = s.name  # the norms per piece read it
    return shards
