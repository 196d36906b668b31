"""`tests/helpers/record_samples.py` (so `launch/train.py`) with fairscale's FullyShardedDataParallel made to run
on CPU ranks over gloo, to test the fairscale engine's ZeRO-3 path (`parallel.engine=fairscale`,
`parallel.zero_stage=3`) where no GPU is.

fairscale 0.4.13's FSDP is CPU-ready except for its CUDA streams: it orders its all-gathers and
reduce-scatters against the compute stream with `torch.cuda.Stream`, `torch.cuda.stream(...)`,
`torch.cuda.current_stream()`, `Tensor.record_stream` and `torch.cuda.synchronize()`. On a CPU every
operation runs in program order, so each of these is correctly a no-op: this helper puts one host "stream"
in their place. It also turns off `_reduce_scatter_base` (gloo checks it by the first dimension, which
fairscale's bucket does not keep; fairscale's own switch, ENABLE_NCCL_BASE_COLLECTIVES=0, selects the list
forms) and lifts bigtrain's two CUDA-only guards for FSDP. Everything else (sharding, gathering, reducing,
accumulating, bigtrain's optimizer, checkpoints) is the code that runs on GPUs.
"""

import contextlib
import os
import runpy
import sys
from pathlib import Path

os.environ["ENABLE_NCCL_BASE_COLLECTIVES"] = "0"  # read by fairscale when imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fairscale.nn.data_parallel import fully_sharded_data_parallel as fsdp  # noqa: E402

from bigtrain.compat import fairscale as fairscale_compat  # noqa: E402
from bigtrain.config import parallel_checks  # noqa: E402


class HostStream:
    """A CUDA stream's interface where work already runs in order."""

    def wait_stream(self, other: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


HOST = HostStream()
_record_stream = torch.Tensor.record_stream
_setup_streams = fsdp.FullyShardedDataParallel._setup_streams


def record_stream(tensor: torch.Tensor, stream: object) -> None:
    if not isinstance(stream, HostStream):
        _record_stream(tensor, stream)


def setup_streams(self: fsdp.FullyShardedDataParallel) -> None:
    fresh = self._is_root and not self._streams
    _setup_streams(self)  # without CUDA it creates the reduce-scatter bucketer only, and shares it
    if fresh:
        for name in ("fp32_to_fp16", "all_gather", "post_backward"):
            self._streams[name] = HOST


torch.cuda.current_stream = lambda device=None: HOST
torch.cuda.stream = lambda stream: contextlib.nullcontext()
torch.cuda.synchronize = lambda device=None: None
torch.Tensor.record_stream = record_stream
fsdp.FullyShardedDataParallel._setup_streams = setup_streams
parallel_checks.fsdp_device_allowed = lambda device: True
fairscale_compat.fsdp_runs_on = lambda device_type: True

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).with_name("record_samples.py")), run_name="__main__")
