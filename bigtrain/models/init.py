"""Weight initialization, deterministic from a seed.

normal: every linear and embedding weight ~ N(0, σ), σ = init_std; residual output projections
(attention o_proj, FFN down) use σ / sqrt(2 · n_blocks) as in GPT-2, so the residual stream's variance
does not grow with depth. xavier: linears ~ U(±sqrt(6 / (fan_in + fan_out))), embeddings ~ N(0, d^-0.5)
(the original Transformer, whose embeddings are then scaled by sqrt(d)). Biases 0, norm weights 1.

A sharded model (tensor parallelism) passes `shards`: each listed parameter holds one slice of the full
tensor. The full tensor is drawn from the same generator at the same point of the stream and the slice
kept, so a sharded model built from seed S holds exactly the shards of the unsharded model from seed S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

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


@torch.no_grad()
def init_weights(model: TransformerLM, seed: int, shards: dict[str, Shard] | None = None) -> None:
    cfg = model.cfg
    shards = shards or {}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_blocks = sum(len(stack) for stack in model.stacks())
    residual_std = cfg.init_std / math.sqrt(2 * n_blocks)
    seen: set[int] = set()

    def fill(name: str, t: torch.Tensor, draw) -> None:
        # Draw on the CPU from one generator so the values do not depend on the device or layout.
        shard = shards.get(name)
        cpu = torch.empty(shard.full_shape(t.shape) if shard else t.shape, dtype=torch.float32)
        draw(cpu)
        t.copy_(shard.take(cpu) if shard else cpu)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            if id(module.weight) in seen:  # tied weight: initialized once
                continue
            seen.add(id(module.weight))
            if cfg.init == "xavier":
                if isinstance(module, nn.Embedding):
                    std = cfg.d_model ** -0.5
                    fill(f"{name}.weight", module.weight, lambda c, s=std: c.normal_(0.0, s, generator=gen))
                else:
                    fill(f"{name}.weight", module.weight, lambda c: nn.init.xavier_uniform_(c, generator=gen))
            else:
                std = residual_std if name.rsplit(".", 1)[-1] in RESIDUAL_PROJECTIONS else cfg.init_std
                fill(f"{name}.weight", module.weight, lambda c, s=std: c.normal_(0.0, s, generator=gen))
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
            module.weight.fill_(1.0)  # norms
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
