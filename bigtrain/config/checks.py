"""The rules of a config, checked at load time: `validate` runs every section's rules and returns the resolved
layout (`bigtrain.config.layout`).

Each failed rule raises `ConfigError` naming the key(s), the value(s) and what is allowed. These rules read the
config alone (arithmetic on its values): nothing here imports torch, the models or DeepSpeed. The one rule that
needs a built model (the pipeline stages, cut by DeepSpeed's partitioner) runs after loading, in the layer that
owns it (`bigtrain.parallel.validate.load_run_config`).
"""

from __future__ import annotations

import dataclasses
import math

from bigtrain.config.context_checks import check_context
from bigtrain.config.data_checks import check_data
from bigtrain.config.fp8_checks import check_fp8
from bigtrain.config.layout import Layout
from bigtrain.config.log_checks import check_log_trackers
from bigtrain.config.model_checks import check_model, check_moe
from bigtrain.config.parallel_checks import check_deepspeed_section, check_parallel
from bigtrain.config.rules import at_most_timeout, fraction, positive, require, show
from bigtrain.config.schedule_checks import check_pipeline_schedule
from bigtrain.config.schema import Config, key_name

INT64 = (-(2**63), 2**63, "be an integer in [-2**63, 2**63) (64 bits)")


INT_RANGES: dict[str, tuple[int, int, str]] = {
    "train.seed": (0, 2**32, "lie in [0, 2**32) = [0, 4294967295] (the seed of every random generator)"),
}


FINITE_HINTS: dict[str, str] = {
    "train.hang_timeout": " train.hang_timeout=0 turns the watchdog off.",
    "parallel.collective_timeout": " Collectives cannot wait forever; give a number of seconds.",
    "optim.grad_clip": " optim.grad_clip=0 disables clipping.",
    "optim.lamb_max_trust_ratio": " optim.lamb_max_trust_ratio=null leaves the trust ratio unbounded.",
    "log.peak_tflops": " log.peak_tflops=null looks the peak up for known GPUs.",
}


PATH_KEYS = ("data.source", "data.tokenizer", "data.cache_dir", "run.dir")


def check_numbers(cfg: Config) -> None:
    """Every integer key fits its range (64 bits unless narrower), every float key is finite."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            key, value = f"{section.name}.{key_name(f)}", getattr(values, f.name)
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int):
                low, high, allowed = INT_RANGES.get(key, INT64)
                require(low <= value < high, f"Config key '{key}' must {allowed}, got {show(value)}.")
            elif isinstance(value, float):
                require(math.isfinite(value), f"Config key '{key}' must be a finite number, got {value}."
                        f"{FINITE_HINTS.get(key, '')}")


def check_paths(cfg: Config) -> None:
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        require(isinstance(value, str) and value != "" and "\x00" not in value,
                f"Config key '{key}' must be a non-empty path without NUL characters, got {show(value)}.")


def check_training(cfg: Config, layout: Layout) -> None:
    t = cfg.train
    positive("train.steps", t.steps)
    positive("train.global_batch_size", t.global_batch_size)
    positive("train.micro_batch_size", t.micro_batch_size)
    dp = layout.data
    per_step = t.micro_batch_size * dp
    require(t.global_batch_size % per_step == 0,
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} * data-parallel size {dp} = {per_step}. Use a global batch that is a "
            f"multiple of {per_step}, or a micro batch that divides {t.global_batch_size // dp}.")
    m_b = cfg.parallel.micro_batches
    if m_b is not None:
        steps = t.global_batch_size // per_step
        require(m_b == steps, f"parallel.micro_batches={m_b} but train.global_batch_size={t.global_batch_size} / "
                f"(train.micro_batch_size={t.micro_batch_size} * data-parallel size {dp}) = {steps} micro-batches "
                f"per step. Set parallel.micro_batches={steps} or null (it follows from the batch sizes), or "
                f"change train.micro_batch_size so that the division gives {m_b}.")
    require(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}.")
    if t.eval_samples is not None:
        positive("train.eval_samples", t.eval_samples)
    if t.eval_batches is not None:
        positive("train.eval_batches", t.eval_batches)
    require(t.early_stop_patience >= 0, f"train.early_stop_patience must be >= 0, got "
            f"{t.early_stop_patience}.")
    require(t.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {t.sample_tokens}.")
    if t.threads is not None:
        positive("train.threads", t.threads)
    positive("train.max_skipped_steps", t.max_skipped_steps)
    require(t.hang_timeout >= 0, f"train.hang_timeout must be >= 0 seconds (0 = no watchdog), got {t.hang_timeout}.")
    at_most_timeout("train.hang_timeout", t.hang_timeout)

    o = cfg.optim
    positive("optim.lr", o.lr)
    fraction("optim.beta1", o.beta1)
    fraction("optim.beta2", o.beta2)
    positive("optim.eps", o.eps)
    require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
    require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}.")
    if o.lamb_max_trust_ratio is not None:
        positive("optim.lamb_max_trust_ratio", o.lamb_max_trust_ratio)

    s = cfg.schedule
    require(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}.")
    if s.name == "noam":
        require(s.warmup_steps > 0, "schedule.name='noam' divides by schedule.warmup_steps; set it > 0.")
        positive("schedule.noam_scale", s.noam_scale)
    fraction("schedule.min_lr_ratio", s.min_lr_ratio, high_open=False)
    fraction("schedule.decay_fraction", s.decay_fraction, low_open=True, high_open=False)

    c, lg = cfg.checkpoint, cfg.log
    require(c.every >= 0, f"checkpoint.every must be >= 0 (0 = only at the end), got {c.every}.")
    positive("checkpoint.keep", c.keep)
    require(c.layout_free_every is None or c.layout_free_every >= 0, f"checkpoint.layout_free_every must be >= 0 "
            f"(0 = never) or null (by the model's size), got {show(c.layout_free_every)}.")
    legacy = cfg.deepspeed.get("checkpoint", {})
    require(not (c.async_ and isinstance(legacy, dict) and legacy.get("checkpoint_serialization") is False),
            "checkpoint.async=true writes DeepSpeed's files as torch.save's zip format, and "
            "deepspeed.checkpoint.checkpoint_serialization=false asks for the legacy one. Remove that key, or set "
            "checkpoint.async=false.")
    positive("log.every", lg.every)
    if lg.peak_tflops is not None:
        positive("log.peak_tflops", lg.peak_tflops)
    if lg.attention_images:
        check_attention_images(cfg)
    check_log_trackers(cfg)


def check_attention_images(cfg: Config) -> None:
    """log.attention_images draws whole attention layers held by one rank, into TensorBoard or a tracker."""
    p, lg = cfg.parallel, cfg.log
    require(lg.tensorboard or lg.mlflow.experiment or lg.wandb.project, "log.attention_images=true draws into "
            "TensorBoard or an experiment tracker, but log.tensorboard=false and neither log.mlflow.experiment nor "
            "log.wandb.project is set. Set log.tensorboard=true (or a tracker), or log.attention_images=false.")
    require(p.tensor == 1 and p.pipeline == 1,
            f"log.attention_images=true with parallel.tensor={p.tensor} and parallel.pipeline={p.pipeline} is "
            f"refused: the maps are drawn from whole attention layers on one rank, and tensor parallelism splits "
            f"them by heads, pipeline parallelism across stages. Use parallel.tensor=1 and parallel.pipeline=1 "
            f"(data parallelism and ZeRO work), or draw the maps after training with `bigtrain attention RUN_DIR "
            f"--text TEXT --out FILE.png`.")


def validate(cfg: Config, world_size: int = 1) -> Layout:
    """Run every rule; raise ConfigError on the first that fails. Returns the layout `cfg` resolves to on
    `world_size` ranks."""
    require(isinstance(world_size, int) and world_size >= 1, f"The world size must be at least 1, got "
            f"{show(world_size)}.")
    check_numbers(cfg)
    check_paths(cfg)
    check_model(cfg)
    check_context(cfg)
    layout = check_parallel(cfg, world_size)
    check_pipeline_schedule(cfg, layout)
    check_moe(cfg, layout)
    check_training(cfg, layout)
    check_fp8(cfg, layout)
    check_data(cfg)
    check_deepspeed_section(cfg, layout)
    return layout
