"""Rules of the `parallel` section on a world of ranks: the layout divides the world, the engine the layout
resolves to (`bigtrain.config.layout.resolve_layout`) serves what is asked of it, and DeepSpeed's derived config
(with the `deepspeed:` passthrough) does not contradict bigtrain's."""

from __future__ import annotations

from bigtrain.config.deepspeed import derive_deepspeed_config
from bigtrain.config.layout import ENGINE_NAMES, Layout, resolve_layout
from bigtrain.config.model_checks import check_tensor_parallel
from bigtrain.config.rules import at_most_timeout, positive, require, show
from bigtrain.config.schema import Config


def fsdp_device_allowed(device: str) -> bool:
    """train.device values fairscale's FullyShardedDataParallel may be asked for (it runs on CUDA only; `auto`
    is checked again by the engine on the device it resolves to)."""
    return device != "cpu"


def check_fairscale(cfg: Config) -> None:
    """What the fairscale engine serves: data parallelism with OSS (+ ShardedDataParallel, or FSDP on CUDA),
    composed with tensor parallelism."""
    p, t = cfg.parallel, cfg.train
    require(p.zero_stage in (1, 2, 3), f"parallel.engine='fairscale' shards the optimizer state: set "
            f"parallel.zero_stage to 1 (OSS), 2 (OSS + ShardedDataParallel) or 3 (FullyShardedDataParallel, "
            f"CUDA only), not {p.zero_stage}; for no sharding use parallel.engine=auto.")
    require(p.pipeline == 1, f"parallel.engine='fairscale' has no pipeline schedule, but parallel.pipeline="
            f"{p.pipeline}. Use parallel.engine=auto (DeepSpeed's pipeline engine) or parallel.pipeline=1.")
    require(t.precision != "fp16", "parallel.engine='fairscale' runs fp32 or bf16 (fp32 weights, bf16 autocast); "
            "train.precision=fp16 would need a sharded loss scaler. Use train.precision=bf16, or "
            "parallel.engine=deepspeed.")
    require(not p.offload_optimizer, "parallel.offload_optimizer=true is DeepSpeed's: the fairscale engine keeps "
            "the optimizer state on the device. Set it to false, or use parallel.engine=deepspeed.")
    if p.zero_stage == 3:
        require(fsdp_device_allowed(t.device), "parallel.engine='fairscale' with parallel.zero_stage=3 is fairscale's "
                "FullyShardedDataParallel, which runs on CUDA GPUs only, but train.device='cpu'. Use "
                "parallel.zero_stage=1 or 2, or parallel.engine=deepspeed.")


def check_torch(cfg: Config, world_size: int) -> None:
    """What parallel.engine=torch serves: one process without ZeRO (the plain engine); on several ranks data
    parallelism with PyTorch's FSDP2 (parameters, gradients and optimizer state sharded), composed with tensor
    and sequence parallelism; with pipeline stages, torch.distributed.pipelining's schedules, whose data-parallel
    ranks hold whole replicas of their stages and all-reduce gradients (zero_stage 0) or shard each stage with
    FSDP2 (zero_stage 2 or 3)."""
    p, t = cfg.parallel, cfg.train
    if world_size == 1:
        require(p.zero_stage == 0, f"parallel.engine='torch' on one process is the plain engine, which shards "
                f"nothing: parallel.zero_stage must be 0 there, got {p.zero_stage}. Set parallel.zero_stage=0, or "
                f"use parallel.engine=auto (DeepSpeed's ZeRO).")
        return
    if p.pipeline > 1:
        require(p.zero_stage != 1, f"parallel.engine='torch' with parallel.pipeline={p.pipeline} runs "
                f"torch.distributed.pipelining's schedules, whose data-parallel ranks either hold whole replicas of "
                f"their stages (parallel.zero_stage=0) or shard them with FSDP2 (2: parameters kept gathered from "
                f"forward to backward, 3: sharded again after each forward); parallel.zero_stage=1 (optimizer "
                f"state alone sharded) has no FSDP2 form, got 1. Set parallel.zero_stage to 0, 2 or 3, or use "
                f"parallel.engine=auto (DeepSpeed's pipeline engine, ZeRO-1).")
        tied = cfg.model.tie_embeddings or cfg.model.family == "seq2seq"
        require(p.zero_stage == 0 or p.pipeline_schedule != "dualpipev" or not tied,
                f"parallel.pipeline_schedule='dualpipev' with parallel.zero_stage={p.zero_stage} is refused: "
                f"DualPipeV puts the first and the last stage on pipeline rank 0, so the tied embedding "
                f"(model.tie_embeddings, or the seq2seq decoder's) would sit in two FSDP2 roots on one rank. Use "
                f"parallel.zero_stage=0, model.tie_embeddings=false (decoder-only models), or "
                f"parallel.pipeline_schedule=interleaved_1f1b or zero_bubble.")
    else:
        require(p.zero_stage in (2, 3), f"parallel.engine='torch' on {world_size} ranks is PyTorch's FSDP2, which "
                f"shards parameters, gradients and optimizer state: set parallel.zero_stage to 2 (parameters kept "
                f"gathered from forward to backward) or 3 (parameters sharded again after each forward), not "
                f"{p.zero_stage}; for ZeRO-0 or ZeRO-1 use parallel.engine=auto (DeepSpeed) or fairscale.")
    require(t.precision != "fp16", "parallel.engine='torch' on several ranks runs fp32 or bf16 (fp32 master "
            "weights, FSDP2's bf16 compute); train.precision=fp16 would need a sharded loss scaler. Use "
            "train.precision=bf16, or parallel.engine=deepspeed.")
    require(not p.offload_optimizer, "parallel.offload_optimizer=true is DeepSpeed's: parallel.engine='torch' "
            "keeps the optimizer state on the device. Set it to false, or use parallel.engine=deepspeed.")


def check_parallel(cfg: Config, world_size: int) -> Layout:
    """The rules of the parallel section on `world_size` ranks; returns the resolved layout."""
    p = cfg.parallel
    positive("parallel.tensor", p.tensor)
    positive("parallel.pipeline", p.pipeline)
    positive("parallel.checkpoint_every_n_layers", p.checkpoint_every_n_layers)
    positive("parallel.collective_timeout", p.collective_timeout)
    at_most_timeout("parallel.collective_timeout", p.collective_timeout)
    require(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}.")
    check_tensor_parallel(cfg)
    layout = resolve_layout(cfg, world_size)  # the layout divides the world
    if p.engine == "torch":
        check_torch(cfg, world_size)
    if p.pipeline > 1:
        require(layout.engine != "pipeline" or p.zero_stage <= 1, f"parallel.zero_stage={p.zero_stage} with "
                f"parallel.pipeline={p.pipeline} is refused: DeepSpeed's pipeline engine supports ZeRO stages 0 and "
                f"1 only (ZeRO-2/3 would shard gradients or parameters that the pipeline schedule keeps per "
                f"micro-batch). Use parallel.zero_stage=1, or parallel.engine=torch (torch.distributed.pipelining's "
                f"schedules).")
        method = p.partition_method
        require(method in ("parameters", "uniform") or method.startswith("type:"),
                f"parallel.partition_method={show(method)} is not known; use 'parameters', 'uniform' or "
                f"'type:<regex of a layer class>' (e.g. 'type:BlockPipe').")
    if p.engine == "fairscale":
        check_fairscale(cfg)
    if p.offload_optimizer:
        require(p.zero_stage >= 1, "parallel.offload_optimizer=true needs ZeRO: set parallel.zero_stage to 1, 2 "
                "or 3.")
    if cfg.optim.name == "lamb" and layout.deepspeed:
        require(p.zero_stage in (0, 1, 2),
                f"optim.name='lamb' with parallel.zero_stage={p.zero_stage} is refused: ZeRO-3 partitions "
                f"parameters so that bigtrain cannot compute LAMB's per-tensor trust ratios exactly. Use "
                f"parallel.zero_stage=1 or 2 (exact), or optim.name=adamw.")
        require(p.zero_stage > 0 or cfg.train.precision == "fp32",
                f"optim.name='lamb' with train.precision={cfg.train.precision} and parallel.zero_stage=0 is refused: "
                f"DeepSpeed's mixed-precision optimizer flattens all parameters, so the per-tensor trust ratios "
                f"would be wrong. Use parallel.zero_stage=1 or 2 (exact), or train.precision=fp32.")
    return layout


def check_deepspeed_section(cfg: Config, layout: Layout) -> None:
    """The `deepspeed:` passthrough is for DeepSpeed's engines only, and may not contradict a key bigtrain derives
    (checked once the batch arithmetic is known to divide)."""
    if not layout.deepspeed:
        require(not cfg.deepspeed, f"The deepspeed: section is set but this run does not use DeepSpeed (its engine "
                f"is {ENGINE_NAMES[layout.engine]}, on {layout.describe()}). Set parallel.engine=deepspeed, or "
                f"remove the deepspeed: section.")
    else:
        derive_deepspeed_config(cfg, layout.data)
