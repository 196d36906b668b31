"""An engine's model and optimizer state as layout-free pieces, and back (`layout_free.py`).

Where a rank's state lives depends on the engine:

    per-parameter  the plain engine, and DeepSpeed without a ZeRO wrapper (ZeRO-0 fp32, also under the pipeline
                   engine): each parameter (a tensor-parallel shard) and its optimizer state, whole; under
                   fairscale's OSS the state of a parameter lives on the one data-parallel rank that owns it
                   (`state_owner`), which writes both
    fragments      ZeRO-1/2 and DeepSpeed's bf16 optimizer: the fp32 master weights and the optimizer state of a
                   parameter group are one flat partition per data-parallel rank; each parameter's share of it
                   is a fragment (`_hp_mapping`: where it starts in the parameter and in the partition)
    partitioned    ZeRO-3, fairscale's FullyShardedDataParallel and FSDP2: each parameter is partitioned flat over
                   the data-parallel ranks (`partition`: which values of it this rank holds, and where; FSDP2's
                   rows of dimension 0 are one range of the flattened parameter)

A piece is written by the ranks that own it: data-parallel rank 0 where a state is replicated over data ranks
(under expert parallelism a routed expert's state by the first rank of its expert-data group, under the expert's
own name),
tensor rank 0 for parameters every tensor rank holds whole, the first pipeline stage for a tied embedding.
On load every rank sets its own share from the pieces that overlap it, one parameter at a time. The DeepSpeed
internals this needs are in `bigtrain.compat.deepspeed`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import nn

from bigtrain.checkpoint.layout_free import Box, LayoutFreeReader, Piece, whole
from bigtrain.compat.deepspeed import (
    fragment_of,
    inner_optimizer,
    is_tied_copy,
    local_partition,
    zero3_layout,
)
from bigtrain.engine.base import ShardedState
from bigtrain.errors import CheckpointError
from bigtrain.models.init import Shard

STATE_KINDS = ("exp_avg", "exp_avg_sq")


def tp_box(shape: torch.Size, shard: Shard | None) -> Box:
    """The box of the full tensor that a (tensor-parallel shard of a) parameter of local `shape` holds."""
    if shard is None:
        return whole(shape)
    full = shard.full_shape(shape)
    box = list(whole(full))
    size = shape[shard.dim]
    box[shard.dim] = (shard.index * size, (shard.index + 1) * size)
    return tuple(box)


def named_local_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters this rank holds (a pipeline stage's only), by their unsplit names, tied ones once."""
    for name, p in model.named_parameters():
        if p.device.type != "meta":
            yield name, p


class StateAdapter:
    """Reads and writes one engine's state as pieces, from where the engine says it lives (`ShardedState`)."""

    def __init__(self, state: ShardedState) -> None:
        self.model, self.shards, self.optimizer = state.model, state.shards, state.optimizer
        self.wrapper = state.wrapper
        self.tensor_rank, self.data_rank = state.tensor_rank, state.data_rank
        # per-parameter state: whether this rank holds a parameter's optimizer state (by default every data rank
        # does, and data rank 0 writes it) or, under OSS, only its owner (which writes it)
        self.holds_state = state.state_owner or (lambda p: True)
        self.writes_state = state.state_owner or state.state_writer or (lambda p: self.data_rank == 0)
        self.params = state.params if state.params is not None else list(named_local_parameters(self.model))
        self.shape_of = state.shape_of
        partition = state.partition
        zero3 = zero3_layout(self.wrapper) if self.wrapper is not None else None
        if partition is None and zero3 is not None:
            partition = functools.partial(zero3.partition, data_rank=self.data_rank)
        self.partition = partition
        if partition is not None:
            self.kind = "partitioned"
        elif self.wrapper is None:
            self.kind = "per-parameter"
        else:
            self.kind = "fragments"

    # ---- which pieces this rank writes -------------------------------------------------------------------
    def _owns(self, name: str, p: torch.Tensor) -> bool:
        if is_tied_copy(p):
            return False
        return name in self.shards or self.tensor_rank == 0

    def optimizer_step(self) -> float:
        """The optimizer's step count (0 before the first update); every state of bigtrain's optimizers steps
        together."""
        for state in self.optimizer.state.values():
            if "step" in state:
                return float(state["step"])
        return 0.0

    def pieces(self, grads: bool = False) -> Iterator[Piece]:
        """This rank's pieces of every parameter and its optimizer state; with `grads`, also of the gradient the
        optimizer holds now (kind "grad", where it has one: `bigtrain parity --locate` reads it before a step)."""
        for name, p in self.params:
            if not self._owns(name, p):
                continue
            box = tp_box(self.shape_of(p), self.shards.get(name))
            for start, stop, values in self._local(p, grads):
                for kind, data in values.items():
                    yield Piece(name, kind, box, start, stop, data)

    def _local(self, p: torch.Tensor, grads: bool = False) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """(start, stop, {kind: 1-D values}) of what this rank holds of `p` (flat range of the local shard)."""
        if self.kind == "per-parameter":
            if not self.writes_state(p):
                return
            state = self.optimizer.state.get(p, {})
            values = {"param": p.detach().reshape(-1)}
            values.update({k: state[k].reshape(-1) for k in STATE_KINDS if k in state})
            if grads and p.grad is not None:
                values["grad"] = p.grad.detach().reshape(-1)
            yield 0, p.numel(), values
        elif self.kind == "fragments":
            frag = fragment_of(p)
            if frag is None:
                return
            flat = inner_optimizer(self.wrapper).param_groups[frag.group]["params"][0]
            state = self.optimizer.state.get(flat, {})
            values = {"param": flat.narrow(0, frag.flat_start, frag.numel)}
            values.update({k: state[k].narrow(0, frag.flat_start, frag.numel) for k in STATE_KINDS if k in state})
            if grads and flat.grad is not None:
                values["grad"] = flat.grad.narrow(0, frag.flat_start, frag.numel)
            yield frag.param_start, frag.param_start + frag.numel, values
        else:
            part = self.partition(p)
            if part.numel == 0:
                return
            state = self.optimizer.state.get(part.flat, {})
            values = {"param": part.flat.narrow(0, part.flat_start, part.numel)}
            values.update({k: state[k].narrow(0, part.flat_start, part.numel) for k in STATE_KINDS if k in state})
            if grads and part.flat.grad is not None:
                values["grad"] = part.flat.grad.narrow(0, part.flat_start, part.numel)
            yield part.param_start, part.param_start + part.numel, values

    # ---- loading ---------------------------------------------------------------------------------------------
    def restore(self, reader: LayoutFreeReader, step: float) -> None:
        """Set this rank's weights and optimizer state from `reader` (which holds the unsplit model), one
        parameter at a time, reading only what this rank keeps (under ZeRO, its partition of the moments)."""
        with_state = step > 0 and all(reader.has(name, "exp_avg") for name, _ in self.params)
        flats: dict[int, dict[str, torch.Tensor]] = {}  # fragments / partitioned: flat optimizer state per flat
        with torch.no_grad():
            for name, p in self.params:
                box = tp_box(self.shape_of(p), self.shards.get(name))
                self._check_shape(reader, name, box)
                if self.kind == "per-parameter":
                    self._set_whole(p, reader, name, box, step if with_state else None)
                else:
                    self._set_partition(p, reader, name, box, with_state, flats)
        for state in flats.values():
            flat = state.pop("_flat")
            self.optimizer.state[flat] = {"step": self._step(step, flat), **state}

    def _step(self, step: float, p: torch.Tensor) -> torch.Tensor:
        """The step count as torch's optimizers keep it: fp32, on the parameter's device for fused or capturable
        ones (as `Optimizer.load_state_dict` places it), on the host otherwise."""
        on_device = self.optimizer.defaults.get("fused") or self.optimizer.defaults.get("capturable")
        return torch.tensor(step, dtype=torch.float32, device=p.device if on_device else "cpu")

    def _check_shape(self, reader: LayoutFreeReader, name: str, box: Box) -> None:
        if name not in reader.header["parameters"]:
            raise CheckpointError(f"The layout-free checkpoint in {reader.folder} has no parameter {name}: it was "
                                  f"written for another model.")
        full = reader.shape(name)
        if len(full) != len(box) or any(b > n for (_, b), n in zip(box, full, strict=False)):
            raise CheckpointError(f"The layout-free checkpoint in {reader.folder} holds {name} of shape "
                                  f"{list(full)}; this model's needs {[b for _, b in box]} or more: it was written "
                                  f"for another model shape or vocabulary.")

    def _set_whole(self, p: torch.Tensor, reader: LayoutFreeReader, name: str, box: Box, step: float | None) -> None:
        p.copy_(reader.read(name, "param", box).to(p.dtype))
        if step is not None and self.holds_state(p):
            self.optimizer.state[p] = {"step": self._step(step, p),
                                       **{k: reader.read(name, k, box).to(p.device) for k in STATE_KINDS}}

    def _set_partition(self, p: torch.Tensor, reader: LayoutFreeReader, name: str, box: Box, with_state: bool,
                       flats: dict[int, dict[str, torch.Tensor]]) -> None:
        if self.kind == "fragments":
            p.copy_(reader.read(name, "param", box).to(p.dtype))  # every data rank holds the (bit16) parameter
            frag = fragment_of(p)
            if frag is None:
                return
            flat = inner_optimizer(self.wrapper).param_groups[frag.group]["params"][0]
            flat_start, param_start, numel = frag.flat_start, frag.param_start, frag.numel
        else:
            part = self.partition(p)
            if part.numel == 0:
                return
            flat, flat_start, param_start, numel = part.flat, part.flat_start, part.param_start, part.numel
        weight = reader.read_flat(name, "param", box, param_start, param_start + numel)
        flat.narrow(0, flat_start, numel).copy_(weight)
        held = local_partition(p)  # ZeRO-3: the partition of the (bit16) parameter; FSDP: the flat itself
        if self.kind == "partitioned" and held is not flat:
            held.narrow(0, 0, numel).copy_(weight.to(held.dtype))
        if with_state:
            state = flats.setdefault(id(flat), {"_flat": flat, **{k: torch.zeros_like(flat) for k in STATE_KINDS}})
            for k in STATE_KINDS:
                state[k].narrow(0, flat_start, numel).copy_(reader.read_flat(name, k, box, param_start,
                                                                             param_start + numel))
