"""bigtrain's mixture of experts against DeepSpeed's MoE layer (`deepspeed.moe.layer.MoE`, issue 29), fp32, the same
router and expert weights in both (tests/helpers/deepspeed_moe.py builds DeepSpeed's layer from a bigtrain block).

Where the routing semantics coincide — top-k renormalized, dropless (`drop_tokens=False`), no random token selection,
no noisy gate, no sampled second expert, no z-loss, no shared experts — one forward and backward agree within 1e-6,
a tiny LM with either layer trains the same 20-step AdamW curve within 1e-5, on one process and (one launch) at EP=2
on 2 gloo ranks against bigtrain's expert-parallel layer. The load-balancing losses are related by the formulas of
the helper's docstring (equal for top-1 and top-k ≥ 3; DeepSpeed's top-2 counts first choices only). Where they
differ, the tests below assert the difference (docs/expert_parallel.md, "bigtrain's MoE and DeepSpeed's")."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from bigtrain.distributed.rendezvous import free_port
from bigtrain.models.moe import MoEFeedForward, capacity, route
from tests.helpers import deepspeed_moe
from tests.helpers.deepspeed_moe import D_FF, EXPERTS, D, batches, deepspeed_twin, first_choice_aux, tiny_lm, train

X = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(3))  # 24 tokens
H = X.reshape(-1, D)


def block(top_k: int, capacity_factor: float = 0.0, sharpen: float = 1.0) -> MoEFeedForward:
    """A bigtrain MoE block (SwiGLU experts, no biases) whose router logits are scaled by `sharpen` (a sharper
    router loads the experts unevenly, so that capacity limits drop assignments)."""
    torch.manual_seed(5)
    layer = MoEFeedForward(D, D_FF, "swiglu", False, 0.0, experts=EXPERTS, top_k=top_k,
                           capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.weight.mul_(sharpen)
    return layer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def gate_routes(twin: deepspeed_moe.DeepSpeedFFN) -> tuple[int, torch.Tensor]:
    """DeepSpeed's gate on H: its capacity and [N, k] experts of the kept assignments (-1 where dropped)."""
    _, c, _, indices, *_ = twin.moe.deepspeed_moe.gate(H, None, True)
    return int(c), indices.t().long()


@pytest.mark.parametrize("top_k", [2, 3])
def test_one_forward_and_backward_equal_deepspeeds_where_the_routing_coincides(top_k):
    """Dropless top-2 (DeepSpeed's `top2gating`) and top-3 (`topkgating`): output, input gradient, router and every
    expert gradient within 1e-6 (measured: largest 2.1e-7 / 8.9e-8); l_aux = E · Σ f¹_e P_e at top-2, bigtrain's
    aux at top-3."""
    ours = block(top_k)
    twin = deepspeed_twin(ours)
    up = torch.randn(X.shape, generator=torch.Generator().manual_seed(4))
    x_ours, x_ds = X.clone().requires_grad_(), X.clone().requires_grad_()
    y_ours, y_ds = ours(x_ours), twin(x_ds)
    (y_ours * up).sum().backward()
    (y_ds * up).sum().backward()
    layer = twin.moe.deepspeed_moe
    pairs = [("out", y_ds, y_ours), ("x_grad", x_ds.grad, x_ours.grad),
             ("router", layer.gate.wg.weight.grad, ours.router.weight.grad)]
    for e, expert in enumerate(layer.experts.deepspeed_experts):
        pairs += [(f"expert {e} {n}", p.grad, q.grad) for (n, p), q in
                  zip(expert.named_parameters(), ours.experts[e].parameters(), strict=True)]
    errors = {name: rel(a.detach(), b.detach()) for name, a, b in pairs}
    print(f"top-{top_k}: output {errors['out']:.1e}, largest relative difference {max(errors.values()):.1e}")
    assert max(errors.values()) <= 1e-6, errors
    routing = route(ours.router(H).detach(), top_k)
    expected = first_choice_aux(routing) if top_k == 2 else ours.last.aux
    assert float(twin.l_aux.detach()) == pytest.approx(float(expected), rel=1e-6)
    if top_k == 2:  # DeepSpeed's top-2 l_aux is not bigtrain's aux
        assert abs(float(twin.l_aux.detach()) - float(ours.last.aux)) > 1e-3


@pytest.mark.parametrize(("top_k", "aux_loss_coef"), [(2, 0.0), (3, 0.01)])
def test_a_tiny_lm_trains_the_same_curve_with_deepspeeds_layer(top_k, aux_loss_coef):
    """The 2-block MoE LM and its copy with DeepSpeed's layer in both blocks, 20 AdamW steps on one process: the
    losses within 1e-5 (measured 8e-8) while the loss falls by more than 0.5 nats. The load-balancing loss joins the
    objective at top-3 only, where the two formulas are equal."""
    model = tiny_lm(top_k, aux_loss_coef)
    twin = deepspeed_moe.with_deepspeed_moe(model)
    data = batches(20, 4, seed=1)
    ours, theirs = train(model, data, aux_loss_coef), train(twin, data, aux_loss_coef)
    worst = max(abs(a - b) / abs(a) for a, b in zip(ours, theirs, strict=True))
    print(f"top-{top_k}: loss {ours[0]:.3f} -> {ours[-1]:.3f}, largest relative difference {worst:.1e}")
    assert worst <= 1e-5
    assert ours[-1] < ours[0] - 0.5


@pytest.mark.launches
def test_expert_parallel_layer_equals_deepspeeds_at_ep2(tmp_path):
    """One spawn of 2 gloo ranks (tests/helpers/deepspeed_moe.py `main`): DeepSpeed's layer with ep_size=2 (its own
    expert group and all-to-all) against bigtrain's `ExpertParallelMoE` on each rank's tokens. The block, dropless
    top-2 and top-3: output, input and parameter gradients within 1e-6 (measured 1e-7 / 2e-7) and l_aux by the
    formulas; the tiny LM, 15 steps, gradients averaged over the ranks: the curves within 1e-5 (measured 7e-8 /
    1.4e-7)."""
    out = tmp_path / "ep2.jsonl"
    mp.spawn(deepspeed_moe.main, args=(2, free_port(), str(out), 15), nprocs=2)
    records = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(records) == ["block-top2", "block-top3", "curve-top2", "curve-top3"]
    for name, record in records.items():
        print(f"{name}: largest relative difference {record['max_rel']:.1e}")
        assert record["max_rel"] <= (1e-6 if name.startswith("block") else 1e-5), record
    assert records["block-top3"]["l_aux"] == pytest.approx(records["block-top3"]["aux"], rel=1e-6)
    for name in ("curve-top2", "curve-top3"):
        assert records[name]["moe_layers"] == 2 and len(records[name]["bigtrain"]) == 15
        assert records[name]["bigtrain"][-1] < records[name]["bigtrain"][0] - 0.3


# --- where DeepSpeed's layer differs -------------------------------------------------------------------------


def test_deepspeed_top1_weights_the_expert_by_its_probability():
    """Top-1: bigtrain renormalizes (w = p / p = 1, as Mixtral's top-k), DeepSpeed's `top1gating` keeps w = p_top1
    (Switch): its output is p_top1 · bigtrain's; the load-balancing losses are equal (E · Σ f_e P_e)."""
    ours = block(1)
    twin = deepspeed_twin(ours)
    y_ours, y_ds = ours(X).detach(), twin(X).detach()
    p_top = route(ours.router(H).detach(), 1).probs.max(-1).values
    assert rel(y_ds, y_ours * p_top.reshape(*X.shape[:-1], 1)) <= 1e-6
    assert rel(y_ds, y_ours) > 0.1
    assert float(twin.l_aux.detach()) == pytest.approx(float(ours.last.aux), rel=1e-6)


def test_deepspeed_gives_a_dropped_choices_weight_to_the_kept_one():
    """Top-2 with capacity (drop_tokens=True, min_capacity=0): the capacity (ceil(cf · N · 2 / E)), the order (all
    first choices, then second choices, token order) and so the kept assignments are the same, but DeepSpeed
    renormalizes over the kept choices: a token that lost one choice gets weight 1 on the other (bigtrain keeps its
    w < 1, the dropped weight is not given away). Tokens that kept both are equal."""
    ours = block(2, capacity_factor=1.0, sharpen=4.0)
    twin = deepspeed_twin(ours, drop_tokens=True)
    c, kept_experts = gate_routes(twin)
    routing = route(ours.router(H).detach(), 2, 1.0)
    assert c == capacity(H.shape[0], 2, EXPERTS, 1.0)
    assert torch.equal(kept_experts >= 0, routing.kept) and not routing.kept.all()
    y_ours, y_ds = ours(X).detach().reshape(-1, D), twin(X).detach().reshape(-1, D)
    both, one = routing.kept.all(1), routing.kept.sum(1) == 1
    assert both.any() and one.any()
    assert rel(y_ds[both], y_ours[both]) <= 1e-6
    assert rel(y_ds[one], y_ours[one] / routing.weights[one].sum(1, keepdim=True)) <= 1e-6
    assert rel(y_ds[one], y_ours[one]) > 0.1


def test_deepspeed_raises_the_capacity_to_min_capacity():
    """DeepSpeed's capacity is max(ceil(N / E · k · cf), min_capacity) (default min_capacity 4, 8 at its gate):
    8 tokens at cf 0.5 give bigtrain 2 slots per expert, DeepSpeed 4."""
    ours = block(2, capacity_factor=0.5, sharpen=4.0)
    twin = deepspeed_twin(ours, drop_tokens=True, min_capacity=4)
    _, c, *_ = twin.moe.deepspeed_moe.gate(H[:8], None, True)
    assert capacity(8, 2, EXPERTS, 0.5) == 2 and int(c) == 4


@pytest.mark.parametrize(("top_k", "use_rts"), [(1, False), (1, True), (3, False)])
def test_deepspeed_keeps_other_assignments_under_the_same_capacity(top_k, use_rts):
    """Same capacity, same number kept, other assignments: bigtrain keeps first choices first, then in token
    order; DeepSpeed's top-1 keeps those `torch.topk` picks among equal 0/1 marks (or, with random token selection,
    by random priorities), its top-k ≥ 3 (drop_policy 'probs') the highest probabilities per expert."""
    ours = block(top_k, capacity_factor=1.0, sharpen=4.0)
    twin = deepspeed_twin(ours, drop_tokens=True, use_rts=use_rts)
    torch.manual_seed(0)
    c, kept_experts = gate_routes(twin)
    routing = route(ours.router(H).detach(), top_k, 1.0)
    assert c == capacity(H.shape[0], top_k, EXPERTS, 1.0) and not routing.kept.all()
    assert int((kept_experts >= 0).sum()) == int(routing.kept.sum())
    assert not torch.equal(kept_experts >= 0, routing.kept)


def test_deepspeeds_default_top2_samples_the_second_expert_and_its_gate_is_fp32():
    """`top2_2nd_expert_sampling=True` (DeepSpeed's default) picks the second expert from Gumbel-perturbed logits,
    so the dropless outputs differ; and DeepSpeed's gate always routes in fp32 (bigtrain routes fp64 inputs in
    fp64)."""
    ours = block(2)
    torch.manual_seed(0)
    twin = deepspeed_twin(ours, top2_2nd_expert_sampling=True)
    assert rel(twin(X).detach(), ours(X).detach()) > 0.01
    gates = twin.moe.deepspeed_moe.gate(H.double(), None, True)[5]
    assert gates.dtype == torch.float32
    assert route(ours.double().router(H.double()), 2).probs.dtype == torch.float64
