"""The DeepSpeed config, derived from bigtrain's config (the single source of truth).

Batch arithmetic: train_batch_size = global_batch_size = micro_batch_size × gradient_accumulation_steps ×
data-parallel size. Precision, ZeRO stage and offload, and gradient clipping come from bigtrain's keys; the
`deepspeed:` section may add keys DeepSpeed has but bigtrain does not, and may not contradict derived ones.
This module does not import deepspeed, so configs are checked at load time without it.
"""

from __future__ import annotations

import copy
from typing import Any

from bigtrain.config.schema import Config
from bigtrain.errors import ConfigError

# Derived DeepSpeed keys and the bigtrain keys they come from (for error messages).
SOURCES = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size * data-parallel size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.offload_optimizer",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
}
# DeepSpeed sections that bigtrain owns outright: its own optimizer, schedule and checkpointing are used.
OWNED = {"optimizer": "optim", "scheduler": "schedule", "activation_checkpointing": "parallel.activation_checkpointing",
         "amp": "train.precision"}


# Communication settings for ZeRO on GPUs: gradients reduced in buckets while the backward pass goes on, into
# one contiguous buffer; parameters of ZeRO-3 prefetched ahead of use. Defaults, which `deepspeed:` may change.
ZERO_COMMUNICATION = {
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": 50_000_000,  # elements per reduction bucket (200 MB fp32): large messages, bounded memory
    "allgather_bucket_size": 50_000_000,
}
ZERO3_COMMUNICATION = {
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,  # small tensors (norms, biases) stay whole on every rank
    "stage3_max_live_parameters": 1_000_000_000,
}


def derive_deepspeed_config(cfg: Config, dp_size: int, on_gpu: bool = False, context: int = 1) -> dict[str, Any]:
    """The DeepSpeed config dict for `dp_size` data-parallel ranks, passthrough keys merged in. On GPUs ZeRO
    also gets the communication defaults above (on CPU ranks over gloo there are no streams to overlap on).
    Under context parallelism DeepSpeed's data-parallel group is data × context (`GradientMpu`): each of the
    `context` ranks of a sequence counts as a data rank holding micro_batch_size shards, so its batch size is
    global_batch_size · context (the micro-batches per rank stay global / (micro · dp_size))."""
    t, p = cfg.train, cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    # bigtrain's own AdamW/LAMB then steps the CPU partitions (DeepSpeedCPUAdam would be faster, but is a
    # compiled op and not LAMB).
    derived: dict[str, Any] = {
        "train_batch_size": t.global_batch_size * context,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
        # DeepSpeed 0.19 defaults this to 1.0: always set it from bigtrain (0 = no clipping).
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision in ("bf16", "fp8")},  # fp8: bf16 around the blocks' FP8 matmuls
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # bigtrain hands over its own AdamW / LAMB
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # bigtrain logs progress itself
        "wall_clock_breakdown": False,
    }
    if p.pipeline > 1:
        # Activations cross stages whole on every tensor rank (DeepSpeed's partitioned sends assume one
        # floating tensor per boundary; encoder-decoder models send two).
        derived["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        if p.zero_stage == 0 and t.precision == "fp32":
            # The pipeline engine steps a plain torch optimizer here and reports no gradient norm: bigtrain
            # measures and clips in the optimizer's pre-step hook instead (same formula as DeepSpeed's).
            derived["gradient_clipping"] = 0.0
    if p.expert > 1:
        # Each expert-group rank holds other experts: DeepSpeed's norm would miss them. bigtrain measures the
        # whole model's norm over the expert groups and clips (`bigtrain.parallel.grad_norm`).
        derived["gradient_clipping"] = 0.0
    merged = _merge_passthrough(derived, cfg.deepspeed)
    if on_gpu and p.zero_stage > 0:
        defaults = {**ZERO_COMMUNICATION, **(ZERO3_COMMUNICATION if p.zero_stage == 3 else {})}
        merged["zero_optimization"] = {**defaults, **merged["zero_optimization"]}
    return merged


def _merge_passthrough(derived: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = copy.deepcopy(derived)
    for key, value in extra.items():
        path = f"{prefix}{key}"
        if not prefix and key in OWNED:
            raise ConfigError(f"deepspeed.{key} is not allowed: bigtrain configures it through its "
                              f"'{OWNED[key]}' settings. Remove deepspeed.{key} and set those instead.")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_passthrough(merged[key], value, path + ".")
        elif key in merged and merged[key] != value:
            source = SOURCES.get(path, "bigtrain's own settings")
            raise ConfigError(f"deepspeed.{path}={value!r} contradicts the value {merged[key]!r} that bigtrain "
                              f"derives from {source}. Remove deepspeed.{path} and set {source} instead.")
        else:
            merged[key] = value
    return merged
