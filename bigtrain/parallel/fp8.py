"""FP8 training of the blocks' Linear layers (`train.precision=fp8`), through torchao's float8 casts.

A converted layer computes

    y = dequant( q(s_x · x) q(s_W · W)ᵀ ) + b,   s = fp8_max / amax   (dynamic: amax of this very tensor)

with q the rounding to float8 e4m3 (max 448) and dequant the division by s_x s_W; the backward casts the output
gradient too (e5m2 under the tensorwise recipe, e4m3 under rowwise) for dX = dY W and dW = dYᵀ X. tensorwise:
one amax per tensor; rowwise: one per row of each operand (along the contracted dimension), scales rounded to
powers of 2. The weights stay in their master precision (fp32); only the matmul operands are FP8. On a CPU the
casts are real and the matmul emulated in high precision (torchao's `emulate`), so tests run the same numerics.

What is converted: every nn.Linear inside a block (attention's joined `qkv_proj` and `o_proj`, the feed-forward
`up` / `gate` / `down`, MoE experts), including the tensor-parallel column and row layers, whose shard shapes
count. What stays bf16: embeddings, norms, the output head (all outside the blocks), MoE routers (a routing
decision should not depend on FP8 rounding), the cross-attention `qkv_proj` (its weight is used by row slices),
and layers whose (shard) dimensions are not multiples of 16 (FP8 matmul kernels need them: listed at start).

Each converted layer can run in bf16 instead (`Float8BlockLinear.bf16_now`), which the bf16 guard
(`bigtrain.train.fp8_guard`) uses to rerun a micro-batch, and falls back to bf16 for good (`fallen_back`) when
its block keeps failing the guard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.compat.torchao import Float8Linear, float8_config, float8_matmul
from bigtrain.models.blocks import Block
from bigtrain.parallel.collectives import copy_to_tensor_region
from bigtrain.parallel.tensor_layers import RowParallelLinear, TensorParallel

FP8_MULTIPLE = 16  # FP8 matmul kernels take dimensions that are multiples of 16
STAY_BF16 = ("router", "cross_attn.qkv_proj")  # layer names (suffixes) kept out of FP8 whatever their shape


class Float8BlockLinear(Float8Linear):
    """A block's Linear with FP8 matmul operands (module docstring). A row-parallel layer (`row_tp`) sums its
    partial products over the tensor group before the bias, as `RowParallelLinear`: y = Σ_r x_r W_rᵀ + b."""

    block: str = ""  # the name of the block the layer belongs to (the guard's unit of fallback)
    row_tp: TensorParallel | None = None
    bf16_now: bool = False  # this forward in bf16 (the guard's rerun)
    fallen_back: bool = False  # bf16 for the rest of the run

    @classmethod
    def convert(cls, linear: nn.Linear, config, block: str) -> Float8BlockLinear:
        """The FP8 form of `linear` (same parameters), a layer of block `block`."""
        layer = cls.from_float(linear, config)
        layer.block = block
        layer.row_tp = linear.tp if isinstance(linear, RowParallelLinear) else None
        return layer

    @property
    def uses_fp8(self) -> bool:
        return not (self.bf16_now or self.fallen_back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fp8:
            if torch.is_autocast_enabled(x.device.type):  # the rest of the model's bf16, as autocast would
                x = x.to(torch.get_autocast_dtype(x.device.type))
            y = float8_matmul(x, self.weight, self)
        else:
            y = F.linear(x, self.weight)
        bias = self.bias
        if self.row_tp is not None:
            y = self.row_tp.leave(y)
            if bias is not None and self.row_tp.sequence_parallel:
                bias = copy_to_tensor_region(bias, self.row_tp.group)  # each rank adds b to its own tokens
        return y if bias is None else y + bias.to(y.dtype)

    def extra_repr(self) -> str:
        state = "fp8" if not self.fallen_back else "fallen back to bf16"
        row = f", row-parallel over {self.row_tp.describe()}" if self.row_tp is not None else ""
        return f"{super().extra_repr()}, {state}{row}"


@dataclass
class Fp8Conversion:
    """What `apply_fp8` did: the converted layers' names, the layers left in bf16 for their shapes (name ->
    (in, out) of this rank's shard), the blocks holding FP8 layers (name -> module), emulated or not."""

    recipe: str
    emulated: bool
    converted: list[str] = field(default_factory=list)
    unsupported: dict[str, tuple[int, int]] = field(default_factory=dict)
    blocks: dict[str, nn.Module] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """The start-of-run lines: how FP8 runs, and (one line) the layers whose shapes keep them in bf16."""
        how = ("emulated on the CPU (FP8 casts, high-precision matmul: the numerics, not the speed)"
               if self.emulated else "on the GPU's FP8 kernels")
        lines = [f"train.precision=fp8: {len(self.converted)} Linear layers of {len(self.blocks)} blocks in FP8 "
                 f"({self.recipe} scaling), {how}; embeddings, norms, routers and the head in bf16"]
        if self.unsupported:
            shapes = ", ".join(f"{name} {i}x{o}" for name, (i, o) in self.unsupported.items())
            lines.append(f"fp8: {len(self.unsupported)} layers stay bf16, dimensions not multiples of "
                         f"{FP8_MULTIPLE}: {shapes}")
        return lines


def apply_fp8(model: nn.Module, recipe: str, device: torch.device) -> Fp8Conversion:
    """Replace the Linear layers of every block of `model` by `Float8BlockLinear` (module docstring); emulated
    unless `device` is a CUDA GPU."""
    emulate = torch.device(device).type != "cuda"
    config = float8_config(recipe, emulate)
    result = Fp8Conversion(recipe=recipe, emulated=emulate)
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]
    for block_name, block in blocks:
        for name, linear in list(block.named_modules()):
            if not isinstance(linear, nn.Linear) or isinstance(linear, Float8Linear):
                continue
            full = f"{block_name}.{name}"
            if full.endswith(STAY_BF16):
                continue
            if linear.in_features % FP8_MULTIPLE or linear.out_features % FP8_MULTIPLE:
                result.unsupported[full] = (linear.in_features, linear.out_features)
                continue
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, Float8BlockLinear.convert(linear, config, block_name))
            result.converted.append(full)
            result.blocks[block_name] = block
    return result


def fp8_layers(module: nn.Module) -> list[Float8BlockLinear]:
    return [m for m in module.modules() if isinstance(m, Float8BlockLinear)]


@contextlib.contextmanager
def bf16_only(model: nn.Module) -> Iterator[None]:
    """Every FP8 layer of `model` runs in bf16 inside the block (the guard's reference run)."""
    layers = fp8_layers(model)
    for layer in layers:
        layer.bf16_now = True
    try:
        yield
    finally:
        for layer in layers:
            layer.bf16_now = False


@contextlib.contextmanager
def fp8_again(block: nn.Module) -> Iterator[None]:
    """Inside `bf16_only`: the layers of `block` in FP8 again (those that have not fallen back)."""
    layers = fp8_layers(block)
    for layer in layers:
        layer.bf16_now = False
    try:
        yield
    finally:
        for layer in layers:
            layer.bf16_now = True


def fall_back(model: nn.Module, blocks: list[str]) -> None:
    """The FP8 layers of the named blocks run in bf16 from now on."""
    for layer in fp8_layers(model):
        if layer.block in blocks:
            layer.fallen_back = True
