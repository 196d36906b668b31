"""Model-state memory per rank: measured from the tensors a rank holds, next to the ZeRO paper's formula.

ZeRO (Rajbhandari et al. 2020), Ψ parameters, N_d data-parallel ranks, b bytes per parameter/gradient element
(2 in bf16/fp16, 4 in fp32) and K bytes of optimizer state per parameter (Adam/LAMB: m and v in fp32 = 8, plus
a 4-byte fp32 master copy when the engine keeps one, which DeepSpeed does for ZeRO >= 1 and mixed precision):

    stage 0: bΨ + bΨ + KΨ         stage 1: bΨ + bΨ + KΨ/N_d
    stage 2: bΨ + (b + K)Ψ/N_d    stage 3: (2b + K)Ψ/N_d

(the paper writes these for b = 2, K = 12: 2Ψ + 2Ψ + KΨ/N_d, 2Ψ + (2 + K)Ψ/N_d, (4 + K)Ψ/N_d).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigtrain.compat.deepspeed import GRAD_ATTRS, MASTER_ATTRS, local_partition


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors`: views into one flat buffer (as ZeRO keeps them) count
    the buffer once, whole."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class ModelStateBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def zero_formula(n_params: int, stage: int, dp: int, precision: str, master_copy: bool) -> ModelStateBytes:
    """Per-rank bytes the ZeRO paper predicts for this stage, data-parallel size and precision."""
    b = 4 if precision == "fp32" else 2
    k = 8 + (4 if master_copy else 0)
    psi = n_params
    params = b * psi / dp if stage >= 3 else b * psi
    grads = b * psi / dp if stage >= 2 else b * psi
    optimizer = k * psi / dp if stage >= 1 else k * psi
    return ModelStateBytes(int(params), int(grads), int(optimizer))


def _attr_tensors(obj: object, names: Iterable[str]) -> list[torch.Tensor]:
    """Tensors found under attribute names (a tensor, or lists / dicts of them)."""
    found: list[torch.Tensor] = []
    for name in names:
        value = getattr(obj, name, None)
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
    return found


def measure_params(model: torch.nn.Module) -> int:
    """Parameter bytes on this rank; ZeRO-3 keeps only a partition (`ds_tensor`) of each parameter."""
    return tensor_bytes(local_partition(p) for p in model.parameters())


def measure_grads(model: torch.nn.Module, optimizer: object) -> int:
    return tensor_bytes([p.grad for p in model.parameters()] + _attr_tensors(optimizer, GRAD_ATTRS))


def measure_optimizer(optimizer: object) -> int:
    """fp32 master partitions (if the wrapper keeps them) plus the inner optimizer's state tensors."""
    inner = getattr(optimizer, "optimizer", optimizer)
    state = [t for s in getattr(inner, "state", {}).values() for t in s.values() if isinstance(t, torch.Tensor)]
    return tensor_bytes(_attr_tensors(optimizer, MASTER_ATTRS) + state)


def format_report(per_rank: list[ModelStateBytes], formula: ModelStateBytes, title: str) -> str:
    def mib(x: float) -> str:
        return f"{x / 2**20:9.3f}"

    lines = [title, "rank      params MiB   grads MiB   optim MiB   total MiB"]
    for rank, m in enumerate(per_rank):
        lines.append(f"{rank:<8}{mib(m.params)}   {mib(m.grads)}   {mib(m.optimizer)}   {mib(m.total)}")
    lines.append(f"formula {mib(formula.params)}   {mib(formula.grads)}   {mib(formula.optimizer)}   "
                 f"{mib(formula.total)}")
    return "\n".join(lines)


def tensor_share_note(tensor: int) -> str:
    return f", tensor-parallel shard {tensor}-way (Ψ = this rank's share)" if tensor > 1 else ""


def gathered_report(mine: ModelStateBytes, formula: ModelStateBytes, title: str, group: object, size: int,
                    rank: int, run_dir: Path | None, facts: dict[str, Any]) -> str | None:
    """Gather every data-parallel rank's measured bytes (collective over `group`); on global rank 0 write them
    with `facts` and the formula to run_dir/memory.json and return the report, elsewhere None."""
    import torch.distributed as dist

    gathered: list[ModelStateBytes | None] = [None] * size
    dist.all_gather_object(gathered, mine, group=group)
    if rank != 0:
        return None
    if run_dir is not None:
        (run_dir / "memory.json").write_text(json.dumps({
            **facts, "formula": dataclasses.asdict(formula),
            "ranks": [dataclasses.asdict(m) for m in gathered]}, indent=1) + "\n")
    return format_report(gathered, formula, title)
