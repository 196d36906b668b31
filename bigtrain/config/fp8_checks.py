"""The rules of `train.precision=fp8` (FP8 matrix multiplies through torchao), read from the config alone.

What FP8 runs with so far: one process (the plain engine), tensor and sequence parallelism, data parallelism on
DeepSpeed with ZeRO 0-2, PyTorch's FSDP2 (`parallel.engine=torch`, ZeRO 2 or 3), DeepSpeed's pipeline engine,
activation checkpointing and `train.compile`. Context and expert parallelism, torch's pipeline schedules,
fairscale and DeepSpeed's ZeRO-3 are refused here, naming the key, until they are built and tested with FP8.
Whether the device can run FP8 (a CUDA GPU of compute capability >= 8.9, or a CPU, which emulates it) is checked
when the device is known (`bigtrain.distributed.device.check_precision`).
"""

from __future__ import annotations

from bigtrain.config.layout import Layout
from bigtrain.config.rules import require
from bigtrain.config.schema import Config


def check_fp8(cfg: Config, layout: Layout) -> None:
    """The fp8 keys' own ranges, and the layouts FP8 is not built for yet."""
    t, p = cfg.train, cfg.parallel
    require(t.fp8_check_every >= 0, f"train.fp8_check_every must be >= 0 (0 = no bf16 guard), got "
            f"{t.fp8_check_every}.")
    require(t.fp8_tolerance > 0, f"train.fp8_tolerance must be positive (a relative difference), got "
            f"{t.fp8_tolerance}.")
    if t.precision != "fp8":
        return
    unsupported = {
        "parallel.context": (p.context, p.context > 1, "1"),
        "parallel.expert": (p.expert, p.expert > 1, "1"),
    }
    for key, (value, refused, allowed) in unsupported.items():
        require(not refused, f"train.precision=fp8 with {key}={value} is not built yet: FP8 runs on one process, "
                f"with tensor/sequence parallelism, DeepSpeed data parallelism (ZeRO 0-2) or pipeline stages, and "
                f"FSDP2, compiled or not. Set {key}={allowed}, or train.precision=bf16.")
    require(layout.engine != "torch_pipeline", f"train.precision=fp8 with parallel.engine=torch and "
            f"parallel.pipeline={p.pipeline} (torch.distributed.pipelining's schedules) is not built yet. Use "
            f"parallel.engine=auto (DeepSpeed's pipeline engine, which runs FP8 stages), or train.precision=bf16.")
    require(layout.engine != "fairscale", "train.precision=fp8 with parallel.engine=fairscale is not built yet. "
            "Use parallel.engine=torch (FSDP2) or deepspeed, or train.precision=bf16.")
    require(not (layout.engine == "deepspeed" and layout.zero_stage == 3),
            "train.precision=fp8 with parallel.engine=deepspeed and parallel.zero_stage=3 is not built yet "
            "(DeepSpeed's ZeRO-3 gathers weights around torch's own linear). For sharded weights use "
            "parallel.engine=torch (FSDP2) with parallel.zero_stage=3, or parallel.zero_stage<=2.")
