"""A planted FP8 fault for the bf16 guard's tests (test-only).

`plant_bad_scale(monkeypatch, block)`: the FP8 layers of `block` cast their input with a scale 64 times too large
(s = 64 · 448 / amax instead of 448 / amax, as a stale or corrupted amax would give): most values saturate at the
e4m3 maximum, so the block's output is badly wrong in FP8 and right in bf16.
"""

from __future__ import annotations

import torch

from bigtrain.parallel import fp8

E4M3_MAX = 448.0
TOO_LARGE = 64.0


def saturating_cast(x: torch.Tensor) -> torch.Tensor:
    """x through float8 e4m3 with a scale 64x too large, back in x's dtype (the values the bad scale leaves)."""
    scale = TOO_LARGE * E4M3_MAX / x.detach().abs().amax().float().clamp(min=1e-12)
    return ((x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() / scale).to(x.dtype)


def plant_bad_scale(monkeypatch, block: str) -> None:
    right = fp8.float8_matmul

    def wrong_for_block(x: torch.Tensor, weight: torch.Tensor, layer: fp8.Float8BlockLinear) -> torch.Tensor:
        return right(saturating_cast(x) if layer.block == block else x, weight, layer)

    monkeypatch.setattr(fp8, "float8_matmul", wrong_for_block)

