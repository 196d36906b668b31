"""LAMB against the paper's equations, optimizer grouping, and state-dict round trips."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from bigtrain.config.schema import OptimConfig
from bigtrain.errors import ConfigError
from bigtrain.optim import Lamb, build_optimizer


class Tiny(nn.Module):
    """Several tensor kinds: a decayed matrix, a bias, a large norm gain (trust ratio above the clamp)
    and a zero-initialised matrix (||w|| = 0 on the first step)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3, bias=False)
        self.skip = nn.Parameter(torch.zeros(4, 3))
        with torch.no_grad():
            self.norm.weight.fill_(50.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.fc(x)))) + x @ self.skip


class TinyLM(nn.Module):
    """Embedding, linear with bias, norm, and an output head tied to the embedding."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.proj(self.emb(ids)))))


def _batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(5, 4, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype)


def _backward(model: nn.Module, step: int) -> torch.Tensor:
    x, y = _batch(step, next(model.parameters()).dtype)
    model.zero_grad(set_to_none=True)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss


def _lm_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(7 + step)
    ids = torch.randint(0, 11, (4, 5), generator=g)
    opt.zero_grad(set_to_none=True)
    logits = model(ids)
    nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(1, dims=1).flatten()).backward()
    opt.step()


def _reference_lamb(model: nn.Module, steps: int, lr: float, betas: tuple[float, float], eps: float,
                    wd: dict[str, float], max_ratio: float | None) -> set[str]:
    """Paper equations on plain tensors; returns which trust-ratio cases occurred."""
    b1, b2 = betas
    m = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    seen: set[str] = set()
    for t in range(1, steps + 1):
        _backward(model, t)
        with torch.no_grad():
            for n, w in model.named_parameters():
                g = w.grad
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                m_hat = m[n] / (1 - b1**t)
                v_hat = v[n] / (1 - b2**t)
                r = m_hat / (torch.sqrt(v_hat) + eps) + wd[n] * w
                w_norm = math.sqrt(float((w * w).sum()))
                r_norm = math.sqrt(float((r * r).sum()))
                if w_norm == 0.0 or r_norm == 0.0:
                    ratio = 1.0
                    seen.add("guard")
                else:
                    ratio = w_norm / r_norm
                    if max_ratio is not None and ratio > max_ratio:
                        ratio = max_ratio
                        seen.add("clamp")
                    else:
                        seen.add("plain")
                w.copy_(w - lr * ratio * r)
    return seen


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("max_ratio", [10.0, None])
def test_lamb_matches_paper_equations(dtype: torch.dtype, tol: float, max_ratio: float | None) -> None:
    torch.manual_seed(0)
    model = Tiny().to(dtype)
    ref = copy.deepcopy(model)
    lr, betas, eps, decay = 0.01, (0.9, 0.99), 1e-6, 0.1
    wd = {n: (decay if p.ndim >= 2 else 0.0) for n, p in model.named_parameters()}
    groups = [
        {"params": [p for n, p in model.named_parameters() if wd[n] > 0], "weight_decay": decay},
        {"params": [p for n, p in model.named_parameters() if wd[n] == 0], "weight_decay": 0.0},
    ]
    opt = Lamb(groups, lr=lr, betas=betas, eps=eps, max_trust_ratio=max_ratio)
    steps = 6
    for t in range(1, steps + 1):
        _backward(model, t)
        opt.step()
    seen = _reference_lamb(ref, steps, lr, betas, eps, wd, max_ratio)
    assert seen == ({"guard", "clamp", "plain"} if max_ratio is not None else {"guard", "plain"})
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        # fp32: 1e-6 relative to the magnitude (the norm gain is ~50, where one ulp is 3.8e-6)
        assert ((p - q).abs() / q.abs().clamp(min=1.0)).max().item() <= tol, name
    assert model.skip.abs().sum() > 0  # the zero-initialised tensor moved
    assert int(opt.state[model.fc.weight]["step"]) == steps


@pytest.mark.parametrize("skip_on_device", [False, True])
def test_lamb_multi_tensor_equals_per_tensor(skip_on_device: bool) -> None:
    """The multi-tensor path (`_foreach_*` over a group) gives bitwise the per-tensor path's weights, moments and
    step counts, on the host step count and with `found_inf` on the device (step 3 poisoned and skipped)."""
    models = [Tiny(), Tiny()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [Lamb([{"params": [p for p in m.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                 lr=0.01, foreach=foreach) for m, foreach in zip(models, (True, False), strict=True)]
    assert opts[0]._multi_tensor(list(models[0].parameters())) and not opts[1]._multi_tensor(
        list(models[1].parameters()))
    for t in range(1, 6):
        for model, opt in zip(models, opts, strict=True):
            _backward(model, t)
            if skip_on_device:
                if t == 3:
                    model.fc.weight.grad[0, 0] = float("nan")
                opt.found_inf = torch.tensor(float(t == 3))
            opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opts[0].state[p][key], opts[1].state[q][key])
    assert int(opts[0].state[models[0].fc.weight]["step"]) == (4 if skip_on_device else 5)


def test_lamb_closure_returns_loss() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = Lamb(model.parameters(), lr=1e-3)
    before = model.fc.weight.detach().clone()
    loss = opt.step(lambda: _backward(model, 1))
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert not torch.equal(before, model.fc.weight)


def test_lamb_norms_are_overridable() -> None:
    """A subclass's `_tensor_norms` (e.g. a ZeRO all-reduce) decides the trust ratio."""

    class FixedNorms(Lamb):
        def _tensor_norms(self, p: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tensor(2.0), torch.tensor(1.0)  # ratio 2

    w = nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, -1.0, 1.0])
    FixedNorms([w], lr=0.1, max_trust_ratio=None).step()
    # first step: m_hat / sqrt(v_hat) = sign(g) (up to eps); update = lr * 2 * sign(g)
    torch.testing.assert_close(w.detach(), torch.tensor([0.8, 1.2, 0.8]), atol=1e-5, rtol=0)


def test_adamw_matches_hand_built_adamw() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    hand_model = copy.deepcopy(model)
    cfg = OptimConfig(name="adamw", lr=3e-3, beta1=0.85, beta2=0.97, eps=1e-7, weight_decay=0.2)
    opt = build_optimizer(model, cfg)

    named = list(hand_model.named_parameters())
    assert opt.defaults["fused"] is True  # torch's fused AdamW (CPU and CUDA); same arithmetic, one kernel
    hand = torch.optim.AdamW(
        [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)

    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    for p in (model.proj.bias, model.norm.weight, model.norm.bias):
        assert id(p) in no_decay
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(model.emb.weight), id(model.proj.weight)}

    for t in range(5):
        _lm_step(model, opt, t)
        _lm_step(hand_model, hand, t)
    for p, q in zip(model.parameters(), hand_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_tied_embedding_appears_once() -> None:
    model = TinyLM()
    assert model.head.weight is model.emb.weight
    for name in ("adamw", "lamb"):
        opt = build_optimizer(model, OptimConfig(name=name))
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        assert ids.count(id(model.emb.weight)) == 1


def test_frozen_parameters_are_left_out() -> None:
    model = TinyLM()
    model.norm.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.norm.weight) not in ids and id(model.proj.bias) in ids


def test_unknown_optimizer_raises() -> None:
    with pytest.raises(ConfigError, match="optim.name"):
        build_optimizer(TinyLM(), OptimConfig(name="sgd"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    cfg = OptimConfig(name=name, lr=1e-2)
    straight = TinyLM()
    resumed = copy.deepcopy(straight)

    opt = build_optimizer(straight, cfg)
    for t in range(6):
        _lm_step(straight, opt, t)

    opt = build_optimizer(resumed, cfg)
    for t in range(3):
        _lm_step(resumed, opt, t)
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    fresh = TinyLM()
    fresh.load_state_dict(saved["model"])
    opt = build_optimizer(fresh, cfg)
    opt.load_state_dict(saved["optim"])
    for t in range(3, 6):
        _lm_step(fresh, opt, t)
    for p, q in zip(straight.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
