"""One training step recorded as fingerprints, module by module, on every rank (`bigtrain parity --locate`).

A diagnostic switch, off unless the environment names a step: `BIGTRAIN_CAPTURE_STEP=S` (read here and only
here; `bigtrain parity --locate` sets it for the runs it starts). During step S each rank records the fingerprints
(`bigtrain.train.fingerprint`) of

    weight    every parameter before the step                        (this rank's pieces of it)
    forward   every module's output, per micro-batch                 (as this rank holds it: under context
              parallelism its zig-zag share of the sequence, fingerprinted at the tokens' global positions)
    backward  the gradient of every module's output, per micro-batch (what its backward receives; the engine's
              `backward_scale` is recorded: data-parallel engines backpropagate D · C · ℓ)
    gradient  every parameter's gradient as the optimizer receives it, after the layout's reductions and clipping
              (the clipping coefficient is recorded, so that the comparison can undo it)
    update    what the optimizer changed in every parameter           (after − before, of this rank's pieces)

and writes them, in the order it met them, to run.dir/capture/rankNNNNN.json with its place in the layout. The
parameters' pieces are the layout-free checkpoint's (`bigtrain.checkpoint.state.StateAdapter`): each value of a
parameter is held by exactly one piece on one rank, whatever the engine (tensor shards, pipeline stages, ZeRO
fragments and partitions, FSDP rows), so the fingerprints of a parameter add up over the ranks to the whole one.
Activations are combined by `bigtrain.cli.parity_locate`, which knows the one-device shapes. Memory: one copy of
this rank's parameter pieces (for the update) and a few numbers per tensor; nothing is gathered.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain.checkpoint.state import StateAdapter
from bigtrain.errors import ConfigError
from bigtrain.train.fingerprint import activation_prints, add, piece_print

CAPTURE_ENV = "BIGTRAIN_CAPTURE_STEP"
TENSOR_ENV = "BIGTRAIN_CAPTURE_TENSOR"  # "PHASE NAME MICRO": also keep that record's tensors whole (MICRO -1: none)
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_fpw_module.", "_orig_mod.")


def capture_step() -> int | None:
    """The step `BIGTRAIN_CAPTURE_STEP` names (1-based), or None when it is not set."""
    text = os.environ.get(CAPTURE_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{CAPTURE_ENV}={text!r}: give the 1-based step to record (e.g. {CAPTURE_ENV}=1), or "
                          f"leave it unset.")
    return int(text)


def capture_tensor() -> tuple[str, str, int] | None:
    """The record `BIGTRAIN_CAPTURE_TENSOR` names (phase, name, micro-batch of the global batch), or None."""
    text = os.environ.get(TENSOR_ENV, "").split()
    if not text:
        return None
    if len(text) != 3 or not text[2].lstrip("-").isdigit():
        raise ConfigError(f"{TENSOR_ENV}={' '.join(text)!r}: give 'PHASE NAME MICRO' (e.g. 'forward blocks.0.ffn 0').")
    return text[0], text[1], int(text[2])


def clean_name(name: str) -> str:
    """A module's name in the unwrapped model (engine wrappers' levels removed)."""
    for token in WRAPPERS:
        name = name.replace(token, "")
    return name


class StepCapture:
    """Hooks for one step (a context manager); `result` (the step's StepResult) is set before it exits."""

    def __init__(self, model: nn.Module, engine: Any, coords: tuple[int, int, int, int], sizes: tuple[int, int],
                 rank: int, folder: Path, grad_clip: float, step: int, micro_batches: int) -> None:
        """`coords`: this rank's (tensor, data, pipe, context) coordinates; `sizes`: (tensor, context) sizes."""
        self.model, self.engine = model, engine
        self.tensor_rank, self.data_rank, self.pipe_rank, self.context_rank = coords
        self.tensor_size, self.context_size = sizes
        self.rank, self.folder = rank, folder
        self.grad_clip, self.step, self.micro_batches = grad_clip, step, micro_batches
        self.result: Any = None
        self.order: list[tuple[str, str]] = []  # (phase, name) in the order first met
        self.calls: dict[str, list[dict[str, Any]]] = {}  # module output name -> per forward call
        self.grads: dict[str, dict[int, dict[str, list[float]]]] = {}  # output name -> call -> gradient prints
        self.params: dict[tuple[str, str], list[float]] = {}  # (phase, parameter) -> summed piece prints
        self.before: dict[tuple[str, int], torch.Tensor] = {}
        self.seen_grads: set[tuple[str, int]] = set()
        self.handles: list[Any] = []
        self.wanted = capture_tensor()  # one record kept as this rank's tensors too (after the fingerprints)
        self.tensors: dict[Any, torch.Tensor] = {}  # call (activations) or (box, start, stop) (parameters)

    # ---- parameters --------------------------------------------------------------------------------------
    def _adapter(self) -> StateAdapter:
        return StateAdapter(self.engine.sharded_state())

    def _keep(self, phase: str, name: str, where: Any, t: torch.Tensor) -> None:
        if self.wanted is not None and self.wanted[:2] == (phase, name):
            self.tensors[where] = t.detach().to("cpu", torch.float64, copy=True)

    def _param(self, phase: str, name: str, values: list[float]) -> None:
        key = (phase, name)
        if key not in self.params:
            self.order.append(key)
            self.params[key] = values
        else:
            self.params[key] = add(self.params[key], values)

    def _weights_before(self) -> None:
        for piece in self._adapter().pieces():
            if piece.kind == "param":
                self.before[piece.name, piece.start] = piece.data.detach().clone()
                self._keep("weight", piece.name, (piece.box, piece.start, piece.stop), piece.data)
                self._param("weight", piece.name, piece_print(piece.data, piece.box, piece.start, piece.stop))

    def _gradients(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """The optimizer's pre-step hook. ZeRO-1/2 step the inner optimizer once per parameter group, with only
        that group in `param_groups`: the pieces are found with all of them, then DeepSpeed's list is put back."""
        stepping, optimizer.param_groups = optimizer.param_groups, self.param_groups
        try:
            for piece in self._adapter().pieces(grads=True):
                if piece.kind == "grad" and (piece.name, piece.start) not in self.seen_grads:
                    self.seen_grads.add((piece.name, piece.start))
                    self._keep("gradient", piece.name, (piece.box, piece.start, piece.stop), piece.data)
                    self._param("gradient", piece.name, piece_print(piece.data, piece.box, piece.start, piece.stop))
        finally:
            optimizer.param_groups = stepping

    def _updates(self) -> None:
        for piece in self._adapter().pieces():
            if piece.kind == "param" and (piece.name, piece.start) in self.before:
                change = piece.data.detach().double() - self.before[piece.name, piece.start].double()
                self._keep("update", piece.name, (piece.box, piece.start, piece.stop), change)
                self._param("update", piece.name, piece_print(change, piece.box, piece.start, piece.stop))

    # ---- modules -----------------------------------------------------------------------------------------
    def _outputs(self, name: str, output: Any) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(output, torch.Tensor):
            if output.is_floating_point():
                yield name, output
        elif isinstance(output, tuple | list):
            for i, item in enumerate(output):
                if isinstance(item, torch.Tensor) and item.is_floating_point():
                    yield f"{name}[{i}]", item

    def _forward(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        for key, t in self._outputs(name, output):
            calls = self.calls.setdefault(key, [])
            if not calls:
                self.order.append(("forward", key))
            call = len(calls)
            calls.append({"shape": list(t.shape), "prints": self._prints(t)})
            self._keep("forward", key, call, t)
            if t.requires_grad:
                t.register_hook(lambda g, key=key, call=call: self._backward(key, call, g))

    def _prints(self, t: torch.Tensor) -> dict[str, list[float]]:
        return activation_prints(t, self.tensor_rank, self.tensor_size, self.context_rank, self.context_size)

    def _backward(self, key: str, call: int, grad: torch.Tensor) -> None:
        if key not in self.grads:
            self.grads[key] = {}
            self.order.append(("backward", key))
        self.grads[key][call] = self._prints(grad)
        self._keep("backward", key, call, grad)

    # ---- the step ----------------------------------------------------------------------------------------
    def __enter__(self) -> StepCapture:
        self._weights_before()
        for name, module in self.model.named_modules():
            if name:
                self.handles.append(module.register_forward_hook(functools.partial(self._forward, clean_name(name))))
        optimizer = self.engine.sharded_state().optimizer
        self.param_groups = optimizer.param_groups
        self.handles.append(optimizer.register_step_pre_hook(self._gradients))
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        if kind is None:
            self._updates()
            self.write()

    def _micro(self, call: int, calls: int) -> int:
        """The micro-batch of this rank a module's `call`-th forward of the step belonged to."""
        return call * self.micro_batches // max(calls, 1)

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for phase, name in self.order:
            if phase in ("weight", "gradient", "update"):
                out.append({"phase": phase, "name": name, "print": self.params[phase, name]})
                continue
            calls = self.calls[name]
            per_micro: dict[int, dict[str, list[float]]] = {}
            items = (enumerate(c["prints"] for c in calls) if phase == "forward"
                     else sorted(self.grads[name].items()))
            for call, prints in items:
                micro = self._micro(call, len(calls))
                if micro in per_micro:
                    per_micro[micro] = {k: add(per_micro[micro][k], v) for k, v in prints.items()}
                else:
                    per_micro[micro] = dict(prints)
            for micro, prints in sorted(per_micro.items()):
                out.append({"phase": phase, "name": name, "micro": micro, "shape": calls[0]["shape"],
                            "prints": prints})
        return out

    def write(self) -> None:
        norm = float(self.result.grad_norm) if self.result is not None else 0.0
        coef = min(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip > 0 else 1.0
        record = {"step": self.step, "rank": self.rank, "tensor": self.tensor_rank, "data": self.data_rank,
                  "pipe": self.pipe_rank, "context": self.context_rank, "tensor_size": self.tensor_size,
                  "context_size": self.context_size, "micro_batches": self.micro_batches,
                  "grad_norm": norm, "clip_coef": coef, "backward_scale": getattr(self.engine, "backward_scale", 1.0),
                  "records": self.records()}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{self.rank:05d}.json").write_text(json.dumps(record))
        if self.wanted is not None:
            torch.save({**{k: v for k, v in record.items() if k != "records"}, "wanted": list(self.wanted),
                        "tensors": self._wanted_tensors()}, self.folder / f"tensors-rank{self.rank:05d}.pt")

    def _wanted_tensors(self) -> list[dict[str, Any]]:
        """The kept tensors of the wanted record: parameter pieces with their place, or this rank's activation of
        the wanted micro-batch (its calls summed, as the fingerprints are)."""
        phase, name, micro = self.wanted
        if phase in ("weight", "gradient", "update"):
            return [{"box": box, "start": a, "stop": b, "data": t} for (box, a, b), t in self.tensors.items()]
        calls = len(self.calls.get(name, []))
        mine = [t for call, t in sorted(self.tensors.items())
                if self.data_rank * self.micro_batches + self._micro(call, calls) == micro]
        return [{"data": sum(mine[1:], mine[0])}] if mine else []


def capturing(trainer: Any, step: int, micro_batches: int) -> contextlib.AbstractContextManager:
    """The capture of `step` when `BIGTRAIN_CAPTURE_STEP` names it (`trainer`: a `Trainer` with its engine built),
    else a context that records nothing (its `result` is set and ignored)."""
    if trainer.capture_at != step:
        return _Nothing()
    at = trainer.groups.coords if trainer.groups is not None else None
    coords = (at.tensor, at.data, at.pipe, at.context) if at is not None else (0, 0, 0, 0)
    return StepCapture(trainer.parallel.model, trainer.engine, coords, (trainer.layout.tensor, trainer.layout.context),
                       trainer.env.rank, trainer.run_dir / "capture", trainer.cfg.optim.grad_clip, step, micro_batches)


class _Nothing(contextlib.nullcontext):
    result: Any = None

    def __enter__(self) -> _Nothing:
        return self
