"""Activation bytes saved for backward, without and with activation checkpointing, next to Korthikanti et al.
2022 ("Reducing Activation Recomputation in Large Transformer Models"), eq. 1-2 with t = 1:

    per block, no recomputation:      s·b·h·(34 + 5·a·s/h)   (16-bit activations, 1-byte dropout masks)
    selective (attention core only):  s·b·h·34
    full (keep the block input):      2·s·b·h

s sequence, b micro-batch, h d_model, a heads. The formula assumes 16-bit activations, dropout after the
attention softmax and a materialized s×s score matrix; bigtrain's measurement here is fp32 with
`scaled_dot_product_attention`, which saves no s×s matrix on CPU, so the 5·a·s/h term does not appear and
the other terms are doubled. What must hold is the ordering and the size of the drop.

Run: python bench/activation_memory.py [--seq 256 --batch 4 --d-model 256 --heads 4 --layers 2]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigtrain.config import load_config  # noqa: E402
from bigtrain.models import build_model  # noqa: E402
from bigtrain.parallel import apply_activation_checkpointing  # noqa: E402


@dataclass
class Measurement:
    mode: str
    saved_bytes: int
    per_block: float
    formula_per_block: float


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of distinct tensors autograd saves during one forward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    return sum(seen.values())


def korthikanti(mode: str, s: int, b: int, h: int, a: int) -> float:
    return {"none": s * b * h * (34 + 5 * a * s / h), "selective": 34 * s * b * h, "full": 2 * s * b * h}[mode]


def measure(seq: int = 256, batch: int = 4, d_model: int = 256, heads: int = 4, layers: int = 2,
            dropout: float = 0.1) -> list[Measurement]:
    cfg = load_config(None, [f"model.d_model={d_model}", f"model.n_heads={heads}", f"model.d_ff={4 * d_model}",
                             f"model.n_layers={layers}", f"model.max_seq_len={seq}", f"data.seq_len={seq}",
                             f"model.dropout={dropout}", "model.activation=gelu", "model.norm_position=pre"])
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    outside = _outside_blocks(cfg, ids)  # embedding, final norm, head: checkpointing leaves them alone
    results = []
    for mode in ("none", "selective", "full"):
        model = build_model(cfg.model, 320, "cpu", seed=0)
        apply_activation_checkpointing(model, mode)
        total = saved_activation_bytes(model, ids)
        results.append(Measurement(mode, total, (total - outside) / layers,
                                   korthikanti(mode, seq, batch, d_model, heads)))
    return results


def _outside_blocks(cfg, ids: torch.Tensor) -> int:
    """Saved bytes of the same model with its blocks removed."""
    model = build_model(cfg.model, 320, "cpu", seed=0)
    model.blocks = torch.nn.ModuleList()
    return saved_activation_bytes(model, ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    rows = measure(args.seq, args.batch, args.d_model, args.heads, args.layers)
    print(f"s={args.seq} b={args.batch} h={args.d_model} a={args.heads}, {args.layers} blocks, fp32, dropout 0.1")
    print(f"{'mode':<10} {'measured MiB':>13} {'per block MiB':>14} {'Korthikanti MiB/block':>22} "
          f"{'x2 (fp32)':>10} {'vs none':>8}")
    for r in rows:
        print(f"{r.mode:<10} {r.saved_bytes / 2**20:>13.2f} {r.per_block / 2**20:>14.2f} "
              f"{r.formula_per_block / 2**20:>22.2f} {2 * r.formula_per_block / 2**20:>10.2f} "
              f"{r.per_block / rows[0].per_block:>8.2f}")


if __name__ == "__main__":
    main()
