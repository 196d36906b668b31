"""`launch/train.py` that counts, on every rank, the calls that read a tensor on the host (`Tensor.item`,
`tolist`, `__float__`, `__int__`, `__bool__`, `numpy`: each one a wait for the device on a GPU) made by the
training thread during each step, and writes them to run.dir/syncs-rank<R>.json (tests/test_host_sync_deepspeed.py).

A call is attributed to the code it comes from: the innermost frame outside torch's own package, which is in
bigtrain ("bigtrain"), in DeepSpeed ("deepspeed", its own internal reads) or elsewhere ("other"). Two bigtrain
functions read host tensors by design and count as "host": `StopRequest.agreed` (on GPUs its flag lives on the
CPU control group) and `DeepSpeedEngine.global_counts` (token counts summed on a CPU group). A step's calls are
those from the start of the step (`TrainingData.micro_batches`) to the start of the next one.
"""

import json
import os
import sys
import threading
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

import bigtrain  # noqa: E402
from bigtrain.cli.train import run_train  # noqa: E402
from bigtrain.data.loader import TrainingData  # noqa: E402
from bigtrain.train import trainer  # noqa: E402

SYNCING = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")
HOST_ONLY = {("train/preemption.py", "agreed"), ("distributed/groups.py", "sum_on_host")}  # host tensors only
PACKAGES = {"bigtrain": Path(bigtrain.__file__).parent, "deepspeed": Path(deepspeed.__file__).parent}
TORCH = str(Path(torch.__file__).parent) + os.sep
MAIN = threading.main_thread()
NOW = {"step": 0}
CALLS: dict[int, Counter] = defaultdict(Counter)  # step -> {(kind, where): calls}


def attribute(frame) -> tuple[str, str]:
    """(kind, where) of the innermost frame outside torch, starting at `frame`."""
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return "other", "?"
    path = Path(frame.f_code.co_filename)
    for kind, root in PACKAGES.items():
        if path.is_relative_to(root):
            where = (path.relative_to(root).as_posix(), frame.f_code.co_name)
            if kind == "bigtrain" and where in HOST_ONLY:
                kind = "host"
            return kind, f"{where[0]}:{where[1]}:{frame.f_lineno}"
    return "other", f"{path.name}:{frame.f_code.co_name}:{frame.f_lineno}"


def counting(name: str):
    original = getattr(torch.Tensor, name)

    def counted(self, *args, **kwargs):
        if threading.current_thread() is MAIN and NOW["step"]:
            CALLS[NOW["step"]][attribute(sys._getframe(1))] += 1
        return original(self, *args, **kwargs)

    return counted


for _name in SYNCING:
    setattr(torch.Tensor, _name, counting(_name))

_micro_batches = TrainingData.micro_batches
_run = trainer.Trainer.run


def micro_batches(self, step):
    NOW["step"] = step + 1
    return _micro_batches(self, step)


def run(self):
    try:
        return _run(self)
    finally:
        NOW["step"] = 0
        report = {step: [[kind, where, n] for (kind, where), n in calls.items()] for step, calls in CALLS.items()}
        (self.run_dir / f"syncs-rank{self.env.rank}.json").write_text(json.dumps(report))


TrainingData.micro_batches = micro_batches
trainer.Trainer.run = run

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
