"""The train / held-out split: the last ceil(holdout_fraction * n) samples (at least one) are held out."""

from __future__ import annotations

import math

from bigtrain.errors import DataError


def split_sizes(n: int, holdout_fraction: float, unit: str, fix: str) -> tuple[int, int]:
    """(train, held-out) sample counts; `unit` names the samples, `fix` says how to get more of them."""
    heldout = max(1, math.ceil(holdout_fraction * n))
    train = n - heldout
    if train < 1:
        raise DataError(
            f"data.holdout_fraction: the data makes only {n} {unit}, too few for a training split and a "
            f"held-out split of {heldout} (data.holdout_fraction={holdout_fraction}). {fix}")
    return train, heldout
