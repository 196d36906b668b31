"""Weight initialization, deterministic from a seed.

normal: every linear and embedding weight ~ N(0, σ), σ = init_std; residual output projections
(attention o_proj, FFN down, each expert's down) use σ / sqrt(2 · n_blocks) as in GPT-2, so the residual
stream's variance does not grow with depth. xavier: linears ~ U(±sqrt(6 / (fan_in + fan_out))), embeddings
~ N(0, d^-0.5) (the original Transformer, whose embeddings are then scaled by sqrt(d)). Biases 0, norm weights 1;
the tables of relative position bias and token types are embeddings; a mixture-of-experts block's router and
experts are linears like any other (`bigtrain.models.moe`). Attention's one Q/K/V projection is drawn as its three
parts, each as the separate linear it replaces (its own σ or xavier bound, its own generator, named
`….q_proj.weight`, `….k_proj.weight`, `….v_proj.weight`), then joined in its row layout (`bigtrain.models.qkv`):
the same values as when Q, K and V were three parameters.

Every parameter draws from a CPU generator of its own, seeded from (seed, parameter name), so its values
depend on neither the device nor the layout, and any subset of the model can be initialized on its own:
parameters still on the meta device are skipped (a pipeline stage materializes and initializes only its
layers). A sharded model (tensor parallelism) passes `shards`: each listed parameter holds one slice of the
full tensor; the full tensor is drawn and the slice kept, so a sharded model built from seed S holds exactly
the shards of the unsharded model from seed S.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from bigtrain.models.attention import Attention
from bigtrain.models.qkv import QKV_PARTS, join_qkv
from bigtrain.models.transformer import TransformerLM

RESIDUAL_PROJECTIONS = ("o_proj", "down")


@dataclass(frozen=True)
class Shard:
    """This rank's part of a parameter: chunk `index` of `count` equal chunks along `dim`."""

    dim: int
    index: int
    count: int

    def full_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        full = list(shape)
        full[self.dim] *= self.count
        return tuple(full)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full.chunk(self.count, dim=self.dim)[self.index]


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of one parameter: seeded from the run's seed and the parameter's name."""
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _materialized(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type != "meta"


@torch.no_grad()
def init_weights(model: TransformerLM, seed: int, shards: dict[str, Shard] | None = None,
                 only: nn.Module | None = None) -> None:
    """Initialize the materialized parameters of `model` (of its submodule `only`, when given)."""
    cfg = model.cfg
    shards = shards or {}
    inside = {id(m) for m in only.modules()} if only is not None else None
    n_blocks = sum(len(stack) for stack in model.stacks())
    residual_std = cfg.init_std / math.sqrt(2 * n_blocks)
    seen: set[int] = set()

    qkv_of = {f"{name}.qkv_proj": m for name, m in model.named_modules() if isinstance(m, Attention)}

    def fill(name: str, t: torch.Tensor, draw) -> None:
        shard = shards.get(name)
        shape = shard.full_shape(t.shape) if shard else t.shape
        module = name.rsplit(".", 1)[0]
        if module in qkv_of:  # three parts, each drawn as its own linear, joined in the projection's layout
            attn = qkv_of[module]
            rows = shape[0] // (attn.groups + 2)
            parts = []
            for part, count in zip(QKV_PARTS, (rows * attn.groups, rows, rows), strict=True):
                part_name = f"{module.rsplit('.', 1)[0]}.{part}.weight"
                parts.append(torch.empty(count, *shape[1:], dtype=torch.float32))
                draw(parts[-1], parameter_generator(seed, part_name))
            cpu = join_qkv(*parts, attn.head_dim, attn.groups)
        else:
            cpu = torch.empty(shape, dtype=torch.float32)
            draw(cpu, parameter_generator(seed, name))
        t.copy_(shard.take(cpu) if shard else cpu)

    for name, module in model.named_modules():
        if inside is not None and id(module) not in inside:
            continue
        if isinstance(module, nn.Linear | nn.Embedding):
            if id(module.weight) in seen or not _materialized(module.weight):  # tied: initialized once
                continue
            seen.add(id(module.weight))
            if cfg.init == "xavier":
                if isinstance(module, nn.Embedding):
                    std = cfg.d_model ** -0.5
                    fill(f"{name}.weight", module.weight, lambda c, g, s=std: c.normal_(0.0, s, generator=g))
                else:
                    fill(f"{name}.weight", module.weight, lambda c, g: nn.init.xavier_uniform_(c, generator=g))
            else:
                std = residual_std if name.rsplit(".", 1)[-1] in RESIDUAL_PROJECTIONS else cfg.init_std
                fill(f"{name}.weight", module.weight, lambda c, g, s=std: c.normal_(0.0, s, generator=g))
            if isinstance(module, nn.Linear) and _materialized(module.bias):
                module.bias.zero_()
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
            if _materialized(module.weight):
                module.weight.fill_(1.0)  # norms
            if _materialized(getattr(module, "bias", None)):
                module.bias.zero_()
        elif isinstance(getattr(module, "bias", None), nn.Parameter) and _materialized(module.bias):
            module.bias.zero_()  # a bias of its own (the logit bias)
    for module in model.modules() if only is None else only.modules():
        buffers = list(module.buffers(recurse=False))
        if hasattr(module, "reset_buffers") and not any(b.device.type == "meta" for b in buffers):
            module.reset_buffers()
