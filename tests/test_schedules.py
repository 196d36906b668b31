"""Each learning-rate schedule against its formula written out independently."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from bigtrain.config.schema import ScheduleConfig
from bigtrain.errors import ConfigError
from bigtrain.optim import build_schedule, set_lr

LR, W, T, R, D_MODEL = 3e-4, 10, 100, 0.1, 64
STEPS = [1, 5, W, 55, T]  # step 1, mid-warmup, end of warmup, mid-decay, last step


def _schedule(name: str, **kw: float) -> Callable[[int], float]:
    cfg = ScheduleConfig(name=name, warmup_steps=W, min_lr_ratio=R, **kw)  # type: ignore[arg-type]
    return build_schedule(cfg, peak_lr=LR, total_steps=T, d_model=D_MODEL)


def _decay_progress(step: int) -> float:
    return (step - W) / (T - W)


@pytest.mark.parametrize("step", STEPS)
def test_cosine(step: int) -> None:
    if step <= W:
        want = LR * step / W
    else:
        want = LR * (R + (1 - R) * (1 + math.cos(math.pi * _decay_progress(step))) / 2)
    assert _schedule("cosine")(step) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("step", STEPS)
def test_linear(step: int) -> None:
    want = LR * step / W if step <= W else LR * (R + (1 - R) * (1 - _decay_progress(step)))
    assert _schedule("linear")(step) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("step", STEPS)
def test_constant(step: int) -> None:
    assert _schedule("constant")(step) == pytest.approx(LR * min(1.0, step / W), rel=1e-12)


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("step", STEPS)
def test_noam(step: int, scale: float) -> None:
    want = scale * D_MODEL**-0.5 * min(step**-0.5, step * W**-1.5)
    assert _schedule("noam", noam_scale=scale)(step) == pytest.approx(want, rel=1e-12)


def test_noam_peaks_at_warmup_end() -> None:
    lr_at = _schedule("noam")
    assert lr_at(W) == pytest.approx(D_MODEL**-0.5 * W**-0.5, rel=1e-12)
    assert max(range(1, T + 1), key=lr_at) == W


def test_wsd() -> None:
    lr_at = _schedule("wsd", decay_fraction=0.2)  # D = 20: stable through step 80, decay to step 100
    assert lr_at(1) == pytest.approx(LR / W)
    assert lr_at(5) == pytest.approx(LR * 5 / W)
    assert all(lr_at(s) == LR for s in range(W, 81))  # flat stable phase
    assert lr_at(90) == pytest.approx(LR * (R + (1 - R) * 0.5))
    assert lr_at(95) == pytest.approx(LR * (R + (1 - R) * 0.25))
    assert lr_at(T) == pytest.approx(R * LR)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_decays_end_at_min_lr(name: str) -> None:
    lr_at = _schedule(name)
    assert lr_at(T) == pytest.approx(R * LR, rel=1e-12)
    assert lr_at(T + 50) == pytest.approx(R * LR, rel=1e-12)
    values = [lr_at(s) for s in range(W, T + 1)]
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))  # non-increasing after warmup


def test_no_warmup() -> None:
    cfg = ScheduleConfig(name="constant", warmup_steps=0)
    assert build_schedule(cfg, LR, T, D_MODEL)(1) == LR
    cfg = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=R)
    assert build_schedule(cfg, LR, T, D_MODEL)(1) == pytest.approx(
        LR * (R + (1 - R) * (1 + math.cos(math.pi / T)) / 2))
    cfg = ScheduleConfig(name="noam", warmup_steps=0)
    assert build_schedule(cfg, LR, T, D_MODEL)(4) == pytest.approx(D_MODEL**-0.5 * 4**-0.5)


def test_unknown_name_and_bad_step() -> None:
    with pytest.raises(ConfigError, match="schedule.name"):
        _schedule("step")
    with pytest.raises(ValueError, match="1-based"):
        _schedule("cosine")(0)


def test_set_lr_sets_every_group() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 5.0}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
