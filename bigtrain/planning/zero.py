"""Model-state memory per rank as the ZeRO paper predicts it.

ZeRO (Rajbhandari et al. 2020), Ψ parameters, N_d data-parallel ranks, b bytes per parameter/gradient element
(2 in bf16/fp16, 4 in fp32) and K bytes of optimizer state per parameter (Adam/LAMB: m and v in fp32 = 8, plus
a 4-byte fp32 master copy when the engine keeps one, which DeepSpeed does for ZeRO >= 1 and mixed precision):

    stage 0: bΨ + bΨ + KΨ         stage 1: bΨ + bΨ + KΨ/N_d
    stage 2: bΨ + (b + K)Ψ/N_d    stage 3: (2b + K)Ψ/N_d

(the paper writes these for b = 2, K = 12: 2Ψ + 2Ψ + KΨ/N_d, 2Ψ + (2 + K)Ψ/N_d, (4 + K)Ψ/N_d). The engines
print their measured bytes next to it (`bigtrain.engine.memory`); the pre-flight bound and `bigtrain plan` use it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
