"""Rules of `parallel.pipeline_schedule` and `parallel.virtual_stages` (`bigtrain.parallel.schedules`): what each
schedule can express, checked on the config and its layout. The stage count p·V against the model's layers needs
the built model and is checked in `bigtrain.parallel.validate`.

    schedule           V per rank    micro-batches m (torch's own conditions)
    1f1b               1             m >= p          (DeepSpeed's pipeline engine: any m)
    gpipe              1             any
    interleaved_1f1b   >= 2          m a multiple of max(1, m // p) (torch's rounds of p micro-batches)
    zero_bubble        >= 2          as interleaved_1f1b
    dualpipev          2             m >= p·V

DeepSpeed's pipeline engine runs 1F1B only: any other schedule is refused there, naming `parallel.engine`.
"""

from __future__ import annotations

from bigtrain.config.layout import ENGINE_NAMES, Layout
from bigtrain.config.rules import positive, require
from bigtrain.config.schema import Config

ONE_STAGE = ("1f1b", "gpipe")
ANY_V = ("interleaved_1f1b", "zero_bubble")
V_SHAPED = ("dualpipev",)


def micro_batches(cfg: Config, layout: Layout) -> int | None:
    """Micro-batches per optimizer step on each data-parallel rank (the pipeline's m); None where the batch sizes
    do not divide (`check_training` says so)."""
    t = cfg.train
    per_step = t.micro_batch_size * layout.data
    if per_step <= 0 or t.global_batch_size <= 0 or t.global_batch_size % per_step:
        return None
    return t.global_batch_size // per_step


def check_virtual_stages(schedule: str, v: int) -> None:
    if schedule in ONE_STAGE:
        require(v == 1, f"parallel.pipeline_schedule={schedule!r} holds one stage per rank: parallel.virtual_stages "
                f"must be 1, got {v}. For several stages per rank use interleaved_1f1b or zero_bubble "
                f"(virtual_stages >= 2) or dualpipev (virtual_stages = 2).")
    elif schedule in ANY_V:
        require(v >= 2, f"parallel.pipeline_schedule={schedule!r} interleaves several stages per rank: "
                f"parallel.virtual_stages must be >= 2, got {v}. With one stage per rank use 1f1b or gpipe.")
    else:
        require(v == 2, f"parallel.pipeline_schedule={schedule!r} places exactly 2 stages per rank in a V (rank r "
                f"holds stages r and 2p-1-r): parallel.virtual_stages must be 2, got {v}.")


def check_micro_batches(schedule: str, p: int, v: int, m: int) -> None:
    """torch.distributed.pipelining's own conditions on m micro-batches, stated at load."""
    fix = ("Raise train.global_batch_size or lower train.micro_batch_size (m = global_batch_size / "
           "(micro_batch_size x data-parallel size))")
    if schedule == "1f1b":
        require(m >= p, f"parallel.pipeline_schedule='1f1b' with parallel.pipeline={p} needs at least {p} "
                f"micro-batches per step (torch's Schedule1F1B), but there are {m}. {fix}, or use "
                f"parallel.pipeline_schedule=gpipe.")
    elif schedule in ANY_V:
        rounds = max(1, m // p)
        require(m % rounds == 0, f"parallel.pipeline_schedule={schedule!r} with parallel.pipeline={p} runs the "
                f"micro-batches in rounds of {p}: their number must be a multiple of max(1, m // {p}) = {rounds}, "
                f"but m = {m}. Use m <= {p} or a multiple of {p} micro-batches. {fix}.")
    elif schedule in V_SHAPED:
        require(m >= p * v, f"parallel.pipeline_schedule='dualpipev' with parallel.pipeline={p} x "
                f"parallel.virtual_stages={v} = {p * v} stages needs at least {p * v} micro-batches per step "
                f"(torch's ScheduleDualPipeV), but there are {m}. {fix}.")


def check_pipeline_schedule(cfg: Config, layout: Layout) -> None:
    """The schedule's rules on `cfg` and its resolved `layout`."""
    p = cfg.parallel
    schedule, v = p.pipeline_schedule, p.virtual_stages
    positive("parallel.virtual_stages", v)
    check_virtual_stages(schedule, v)
    if layout.pipeline == 1:
        require(schedule == "1f1b" and v == 1, f"parallel.pipeline_schedule={schedule!r} with "
                f"parallel.virtual_stages={v} orders pipeline stages, but parallel.pipeline=1. Set "
                f"parallel.pipeline > 1, or leave pipeline_schedule=1f1b and virtual_stages=1.")
        return
    if layout.engine == "pipeline":
        require(schedule == "1f1b", f"parallel.pipeline_schedule={schedule!r} is refused with "
                f"parallel.engine={p.engine!r}: it resolves to {ENGINE_NAMES['pipeline']}, which runs 1f1b only. "
                f"Use parallel.pipeline_schedule=1f1b, or a schedule of torch.distributed.pipelining under "
                f"parallel.engine=torch.")
        return
    m = micro_batches(cfg, layout)
    if m is not None:
        check_micro_batches(schedule, layout.pipeline, v, m)
