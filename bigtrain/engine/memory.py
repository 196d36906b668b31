"""Model-state memory per rank: measured from the tensors a rank holds, reported next to the ZeRO paper's
formula (`bigtrain.planning.zero`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from bigtrain.compat.deepspeed import GRAD_ATTRS, MASTER_ATTRS, local_partition
from bigtrain.planning.zero import ModelStateBytes


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
    with `facts` and the formula to run_dir/memory.json, the report to run_dir/memory.txt, and return the report,
    elsewhere None."""
    import torch.distributed as dist

    gathered: list[ModelStateBytes | None] = [None] * size
    dist.all_gather_object(gathered, mine, group=group)
    if rank != 0:
        return None
    report = format_report(gathered, formula, title)
    if run_dir is not None:
        (run_dir / "memory.json").write_text(json.dumps({
            **facts, "formula": dataclasses.asdict(formula),
            "ranks": [dataclasses.asdict(m) for m in gathered]}, indent=1) + "\n")
        (run_dir / "memory.txt").write_text(report + "\n")
    return report
