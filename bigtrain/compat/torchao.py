"""torchao's float8 training API (`torchao.float8`, read from torchao 0.18), in one place.

    float8_config     a `Float8LinearConfig` from a recipe name (tensorwise: one dynamic scale per tensor,
                      e4m3 forward, e5m2 gradients; rowwise: one scale per row, e4m3 throughout, scales rounded to
                      powers of 2), with `emulate` (FP8 casts done for real, the matmul in high precision: the
                      CPU path of the tests) or the GPU's scaled-matmul kernels
    Float8Linear      torchao's FP8 linear layer, the base of `bigtrain.parallel.fp8.Float8BlockLinear`
    float8_matmul     x Wᵀ with both operands cast to FP8 by the layer's config (forward and backward)

torchao is needed only with train.precision=fp8; importing this module without it raises an ImportError that
says how to install it.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

_NOISY = ("torchao", "torch.utils._pytree")  # GPU-only extensions a CPU build cannot load; a deprecation notice
_levels = {name: logging.getLogger(name).level for name in _NOISY}
for _name in _NOISY:
    logging.getLogger(_name).setLevel(logging.ERROR)
try:
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
except ImportError as exc:  # pragma: no cover - the environment, not the code
    raise ImportError("train.precision=fp8 needs torchao: pip install 'torchao>=0.18,<0.19' (make setup installs "
                      "it)") from exc
finally:
    for _name, _level in _levels.items():
        logging.getLogger(_name).setLevel(_level)

__all__ = ["Float8Linear", "Float8LinearConfig", "float8_config", "float8_matmul"]


def float8_config(recipe: str, emulate: bool) -> Float8LinearConfig:
    """torchao's config of `recipe` ("tensorwise" or "rowwise"), emulated or on the GPU's FP8 kernels."""
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


def float8_matmul(x: torch.Tensor, weight: torch.Tensor, layer: Float8Linear) -> torch.Tensor:
    """x Wᵀ through torchao's FP8 autograd function, with `layer`'s casting and matmul configs."""
    return matmul_with_hp_or_float8_args.apply(x, weight.t(), layer.linear_mm_config, layer.config)
