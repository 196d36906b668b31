"""The accelerators `bigtrain plan` knows: usable memory, dense bf16 peak and the bandwidths it assumes.

Peaks are the vendors' dense bf16/fp16 tensor-core figures (no sparsity). Memory is what the device reports
as total (torch.cuda.get_device_properties), which is below the marketing GB figure. Bandwidths are
per-GPU achievable bus bandwidths for collectives (GB/s, 10⁹ bytes): within a node over NVLink / NVSwitch (or
PCIe), across nodes over one InfiniBand / RoCE NIC per GPU; both can be overridden on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bigtrain.errors import ConfigError

GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    peak_tflops: float
    intra_node_gbps: float  # GB/s per GPU inside a node
    inter_node_gbps: float  # GB/s per GPU between nodes
    peak_from: str | None = None  # the known GPU whose peak and bandwidths were taken (only its memory was given)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("h200", 139.8, 989.0, 450.0, 50.0),       # NVLink 4 (900 GB/s bidirectional), NDR 400 Gb/s
    Accelerator("h100", 79.1, 989.0, 450.0, 50.0),
    Accelerator("a100-80gb", 79.2, 312.0, 300.0, 25.0),   # NVLink 3 (600 GB/s bidirectional), HDR 200 Gb/s
    Accelerator("a100-40gb", 39.4, 312.0, 300.0, 25.0),
    Accelerator("l40s", 44.4, 362.0, 32.0, 25.0),         # PCIe 4 x16
    Accelerator("a10", 22.0, 125.0, 32.0, 12.5),
    Accelerator("v100", 31.7, 125.0, 150.0, 12.5),        # 32 GB, NVLink 2
    Accelerator("4090", 23.6, 165.0, 32.0, 12.5),
)}

DEFAULT_GPU = "h100"  # `bigtrain plan` without --gpu or --gpu-memory
ASSUMED_EFFICIENCY = 0.45  # fraction of peak reached in compute: the target and Megatron-LM's 41-47% on H100

# Substrings of torch.cuda.get_device_name() -> dense bf16 peak (TFLOP/s), for MFU of a running job.
PEAK_TFLOPS_BY_DEVICE_NAME = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                              "V100": 125.0, "4090": 165.0, "3090": 71.0}


FLAGS = {"memory_gib": "--gpu-memory", "peak_tflops": "--peak-tflops", "intra_node_gbps": "--intra-node-gbps",
         "inter_node_gbps": "--inter-node-gbps"}


def nearest_in_memory(memory_gib: float) -> Accelerator:
    """The known accelerator whose memory is nearest to `memory_gib` (the first of the table on a tie)."""
    return min(ACCELERATORS.values(), key=lambda a: abs(a.memory_gib - memory_gib))


def accelerator(name: str | None, memory_gib: float | None = None, peak_tflops: float | None = None,
                intra_node_gbps: float | None = None, inter_node_gbps: float | None = None) -> Accelerator:
    """A known accelerator by name (case-insensitive), or one described by its memory (and peak: without it, the
    peak and bandwidths of the known accelerator nearest in memory, recorded in `peak_from`); any given figure
    overrides the table's."""
    if name is None:
        if memory_gib is None:
            raise ConfigError(f"--peak-tflops alone does not say whether a layout fits: name the GPU with --gpu "
                              f"({', '.join(ACCELERATORS)}) or give its memory with --gpu-memory GiB too.")
        if peak_tflops is None:
            near = nearest_in_memory(memory_gib)
            base = replace(near, name="custom", peak_from=near.name)
        else:
            base = Accelerator("custom", memory_gib, peak_tflops, 300.0, 25.0)
    else:
        key = name.strip().lower()
        if key not in ACCELERATORS:
            raise ConfigError(f"--gpu {name!r} is not a GPU bigtrain knows; known: {', '.join(ACCELERATORS)}. "
                              f"For another one give --gpu-memory GiB and --peak-tflops T instead.")
        base = ACCELERATORS[key]
    changes = {k: v for k, v in (("memory_gib", memory_gib), ("peak_tflops", peak_tflops),
                                  ("intra_node_gbps", intra_node_gbps), ("inter_node_gbps", inter_node_gbps))
               if v is not None}
    for key, value in changes.items():
        if not value > 0:
            raise ConfigError(f"{FLAGS[key]} must be positive, got {value}.")
    return replace(base, **changes)
