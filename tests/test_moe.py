"""Mixture-of-experts blocks (`model.moe`, issue 29 item 1): the layer against a per-token loop written here, the
router's renormalization, the auxiliary losses against their formulas, the config refusals, and a one-process
training run that reports the router numbers."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from bigtrain.config import ModelConfig, load_config
from bigtrain.config.layout import Layout
from bigtrain.config.schema import MoEConfig
from bigtrain.engine.step import StepEngine
from bigtrain.errors import ConfigError
from bigtrain.models.build import build_model
from bigtrain.models.loss import Criterion, cross_entropy_sum, model_inputs
from bigtrain.models.moe import MoEFeedForward, collect_router_stats, moe_layers, route
from bigtrain.train.trainer import train
from tests.conftest import read_metrics, single_process, tiny_config, tiny_overrides


def make_layer(activation: str, experts: int = 4, top_k: int = 2, shared: int = 1, capacity_factor: float = 0.0,
               seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(8, 12, activation, True, 0.0, experts, top_k, shared, capacity_factor, 0.01, 0.001)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)  # a router far from uniform, so that capacity drops happen
    return layer.double()


@torch.no_grad()
def reference(layer: MoEFeedForward, x: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Token by token: softmax over the experts, top-k, renormalize; with a capacity, each expert takes
    assignments first choices first, then in token order, up to `capacity`."""
    h = x.reshape(-1, x.shape[-1])
    n = h.shape[0]
    choices = []
    for t in range(n):
        p = torch.softmax(h[t] @ layer.router.weight.t(), -1)
        top = torch.topk(p, layer.top_k)
        total = float(top.values.sum())
        choices.append([(int(e), float(w) / total) for w, e in zip(top.values, top.indices, strict=True)])
    kept = [[True] * layer.top_k for _ in range(n)]
    if capacity is not None:
        load = [0] * len(layer.experts)
        for k in range(layer.top_k):
            for t in range(n):
                e = choices[t][k][0]
                kept[t][k] = load[e] < capacity
                load[e] += 1
    out = torch.zeros_like(h)
    for t in range(n):
        for k, (e, w) in enumerate(choices[t]):
            if kept[t][k]:
                out[t] += w * layer.experts[e](h[t:t + 1])[0]
        for expert in layer.shared:
            out[t] += expert(h[t:t + 1])[0]
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_moe_forward_equals_a_per_token_loop(activation, capacity_factor, dtype):
    layer = make_layer(activation, capacity_factor=capacity_factor).to(dtype)
    x = torch.randn(3, 7, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    n = 21
    capacity = math.ceil(capacity_factor * n * 2 / 4) if capacity_factor else None
    got, want = layer(x), reference(layer, x, capacity)
    worst = float((got - want).abs().max().detach() / want.abs().max())
    print(f"{activation} {dtype} capacity_factor={capacity_factor}: max |moe - loop| / max |loop| = {worst:.2e}")
    assert worst <= 1e-6
    dropped = float(layer.last.dropped)
    if capacity is None:
        assert dropped == 0.0
    else:
        assert 0.0 < dropped < 1.0  # the test routes unevenly enough that some assignments are dropped


def test_a_token_whose_choices_are_all_dropped_keeps_only_the_residual():
    """Without shared experts a fully dropped token's MoE output is 0 (the block adds nothing to the residual)."""
    layer = make_layer("gelu", experts=2, top_k=1, shared=0, capacity_factor=0.1)  # capacity ceil(0.1·n/2)
    x = torch.randn(1, 20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = layer(x)[0]
    routing = route(layer.router(x[0]), 1, 0.1)
    dropped = ~routing.kept[:, 0]
    assert dropped.any() and (out[dropped] == 0).all() and (out[~dropped] != 0).any(dim=-1).all()


def test_router_top_k_renormalization():
    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    routing = route(logits, 3)
    probs = logits.softmax(-1)
    for t in range(10):
        order = probs[t].argsort(descending=True)[:3]
        assert set(routing.experts[t].tolist()) == set(order.tolist())
        chosen = probs[t, routing.experts[t]]
        assert torch.allclose(routing.weights[t], chosen / chosen.sum(), atol=1e-7)
    assert torch.allclose(routing.weights.sum(-1), torch.ones(10), atol=1e-6)


def test_aux_and_z_losses_against_their_formulas():
    layer = make_layer("gelu", experts=5, top_k=2, shared=0, capacity_factor=1.0)
    x = torch.randn(2, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    layer(x)
    stats = collect_router_stats([layer])
    assert layer.last is None  # taken
    logits = (x.reshape(-1, 8) @ layer.router.weight.t()).detach()
    n, e, k = logits.shape[0], 5, 2
    probs = logits.softmax(-1)
    counts = [0] * e
    for t in range(n):
        for j in torch.topk(probs[t], k).indices.tolist():
            counts[j] += 1  # counted before any capacity drop
    aux = e * sum(counts[j] / (n * k) * float(probs[:, j].mean()) for j in range(e))
    z = sum(float(torch.logsumexp(logits[t], -1)) ** 2 for t in range(n)) / n
    assert abs(float(stats.aux) - aux) <= 1e-6 * aux
    assert abs(float(stats.z) - z) <= 1e-6 * z
    assert abs(float(stats.loss.detach()) - (0.01 * aux + 0.001 * z)) <= 1e-6 * (0.01 * aux + 0.001 * z)
    stats.loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_every_nth_block_is_moe_and_dense_is_the_default():
    base = dict(d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=16, dropout=0.0)
    dense = build_model(ModelConfig(**base), 64)
    assert moe_layers(dense) == []
    moe = build_model(ModelConfig(**base, moe=MoEConfig(experts=4, top_k=2, every=2, d_ff=8)), 64)
    assert [isinstance(b.ffn, MoEFeedForward) for b in moe.blocks] == [False, True, False, True]
    assert moe.blocks[1].ffn.experts[0].up.weight.shape == (8, 16)
    # Every new parameter is initialized by the one init path (none left at its empty allocation).
    for name, p in moe.named_parameters():
        assert torch.isfinite(p).all(), name
    router = moe.blocks[1].ffn.router.weight
    assert 0.01 < float(router.detach().std()) < 0.03  # N(0, init_std = 0.02)
    again = build_model(ModelConfig(**base, moe=MoEConfig(experts=4, top_k=2, every=2, d_ff=8)), 64)
    assert all(torch.equal(a, b) for a, b in zip(moe.parameters(), again.parameters(), strict=True))


@pytest.mark.parametrize("overrides, names", [
    (["model.moe.experts=4", "model.moe.top_k=5"], ["model.moe.top_k", "model.moe.experts"]),
    (["model.moe.experts=-1"], ["model.moe.experts"]),
    (["model.moe.experts=4", "model.moe.top_k=0"], ["model.moe.top_k"]),
    (["model.moe.experts=4", "model.moe.every=0"], ["model.moe.every"]),
    (["model.moe.experts=4", "model.moe.every=9"], ["model.moe.every"]),
    (["model.moe.experts=4", "model.moe.shared_experts=-1"], ["model.moe.shared_experts"]),
    (["model.moe.experts=4", "model.moe.d_ff=0"], ["model.moe.d_ff"]),
    (["model.moe.experts=4", "model.moe.aux_loss_coef=-0.1"], ["model.moe.aux_loss_coef"]),
    (["model.moe.experts=4", "model.moe.z_loss_coef=-1"], ["model.moe.z_loss_coef"]),
    (["model.moe.experts=4", "model.moe.capacity_factor=-1"], ["model.moe.capacity_factor"]),
    (["model.moe.experts=4", "parallel.zero_stage=1"], ["model.moe.experts", "not built yet"]),
    (["model.moe.experts=4", "train.compile=true"], ["model.moe.experts", "train.compile"]),
])
def test_bad_moe_configs_fail_at_load_naming_the_key(tmp_path, overrides, names):
    with pytest.raises(ConfigError) as info:
        load_config(None, tiny_overrides(tmp_path / "run", "causal", *overrides))
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(("world", "layout"), [
    (2, ["parallel.zero_stage=1"]), (2, ["parallel.context=2"]), (2, ["parallel.pipeline=2", "parallel.zero_stage=1"]),
    (4, ["parallel.pipeline=2", "parallel.tensor=2"]),
    (4, ["parallel.engine=torch", "parallel.zero_stage=2", "parallel.tensor=2"]),
    (2, ["parallel.engine=torch", "parallel.zero_stage=3", "train.precision=bf16"])])
def test_moe_on_several_ranks_is_refused_at_load(tmp_path, world, layout):
    """Data, expert and tensor parallelism on DeepSpeed's ZeRO-0, pipeline stages with data and expert
    parallelism on its pipeline engine, and data and expert parallelism on FSDP2 (fp32) are built
    (tests/test_expert_parallel.py); the rest is refused."""
    with pytest.raises(ConfigError) as info:
        load_config(None, tiny_overrides(tmp_path / "run", "causal", "model.moe.experts=4", *layout),
                    world_size=world)
    message = str(info.value)
    assert "model.moe.experts=4" in message and "not built yet" in message
    assert "parallel.tensor" in message and "parallel.pipeline" in message and "parallel.zero_stage" in message


def test_a_moe_config_loads_on_one_process(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", "causal", "model.moe.experts=4", "model.moe.top_k=1"))
    assert cfg.model.moe.experts == 4 and cfg.model.moe.top_k == 1


def test_recomputed_moe_blocks_train_like_stored_ones(tmp_path):
    """Activation checkpointing, full (each block recomputed in backward: routing again, the same choices) and
    selective: 4 steps with capacity dropping give the losses, gradient norms and router numbers (per block too) of
    the run that stores every activation, to fp32 rounding (measured: equal)."""
    moe = ("model.moe.experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.25", "model.moe.z_loss_coef=0.01",
           "model.moe.shared_experts=1", "train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=4")
    runs = {}
    for mode in ("none", "full", "selective"):
        train(tiny_config(tmp_path / mode, "causal", *moe, f"parallel.activation_checkpointing={mode}"))
        runs[mode] = read_metrics(tmp_path / mode)[0]
    for mode in ("full", "selective"):
        for step in range(1, 5):
            want, got = runs["none"][step], runs[mode][step]
            for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_dropped_fraction"):
                assert got[key] == pytest.approx(want[key], rel=1e-6), (mode, step, key)
            for block, numbers in want["moe_layers"].items():
                for key, value in numbers.items():
                    assert got["moe_layers"][block][key] == pytest.approx(value, rel=1e-6), (mode, step, block, key)


@pytest.mark.launches
def test_tiny_moe_trains_on_one_process_and_reports_router_numbers(tmp_path):
    run_dir = tmp_path / "run"
    single_process(tiny_overrides(run_dir, "causal", "model.moe.experts=4", "model.moe.top_k=2",
                                  "model.moe.shared_experts=1", "model.moe.capacity_factor=1.25",
                                  "model.moe.z_loss_coef=0.001", "model.activation=swiglu",
                                  "train.global_batch_size=8", "train.micro_batch_size=4"))
    training, _ = read_metrics(run_dir)
    assert sorted(training) == list(range(1, 21))
    for step, record in training.items():
        for key in ("moe_aux_loss", "moe_z_loss", "moe_dropped_fraction"):
            assert math.isfinite(record[key]), (step, key)
        assert record["moe_aux_loss"] > 0 and record["moe_z_loss"] > 0
        assert 0.0 <= record["moe_dropped_fraction"] < 1.0
    first = sum(training[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(training[s]["loss"] for s in (18, 19, 20)) / 3
    print(f"tiny MoE: mean loss of steps 1-3 {first:.4f}, of steps 18-20 {last:.4f}")
    assert last < first - 0.5, (first, last)


def test_softmax_of_router_is_in_fp32_for_half_inputs():
    logits = torch.randn(4, 3, dtype=torch.bfloat16)
    routing = route(logits, 2)
    assert routing.probs.dtype == torch.float32
    assert torch.allclose(routing.probs, F.softmax(logits.float(), -1))


def test_flops_count_the_active_experts_only():
    """6·N of MFU counts top_k of E routed experts: top_k=1 of 4 experts = the dense FFN plus the router."""
    from bigtrain.planning.flops import matmul_parameters

    base = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)
    dense = matmul_parameters(build_model(ModelConfig(**base), 64, "meta"))
    moe = matmul_parameters(build_model(ModelConfig(**base, moe=MoEConfig(experts=4, top_k=1)), 64, "meta"))
    assert moe == dense + 2 * 16 * 4  # + two routers of d_model × experts


def test_export_refuses_moe_models_that_are_not_mixtral():
    """A Hugging Face export of MoE blocks is a Mixtral, so a GPT-2-style (learned positions, GELU) MoE model has no
    architecture to go to (tests/test_hf_mixtral.py). (`bigtrain plan` plans MoE models: tests/test_plan_moe.py.)"""
    from bigtrain.interop.hf_config import hf_kind

    cfg = ModelConfig(positions="learned", norm_position="pre", activation="gelu_tanh", scale_embeddings=False,
                      moe=MoEConfig(experts=4))
    with pytest.raises(ValueError, match="model.moe.experts=4"):
        hf_kind(cfg)


class _PlainSteps(StepEngine):
    """The step skeleton around a bare model: backward only, no update (the gradients stay for the test)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.criterion, self.device, self.layout = model, Criterion(), torch.device("cpu"), Layout()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**model_inputs(batch))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def update(self, found_inf: torch.Tensor) -> None:
        pass

    def measure_norm(self) -> torch.Tensor:
        return torch.zeros(())


def test_the_step_adds_the_router_losses_averaged_over_micro_batches():
    """The skeleton's gradient = ∇ Σ_m (ce_m / N + Σ_layers (a·aux + z·zloss)_m / M), written out here; the
    logged loss is the cross-entropy alone, and the step reports the micro-batch means of the router numbers."""
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, dropout=0.0,
                      moe=MoEConfig(experts=4, top_k=2, shared_experts=1, capacity_factor=1.0, aux_loss_coef=0.5,
                                    z_loss_coef=0.1))
    model, twin = build_model(cfg, 64, seed=3), build_model(cfg, 64, seed=3)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 9), generator=g)
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    result = _PlainSteps(model).train_step(batches, lr=0.0)
    n = sum(int(b["labels"].numel()) for b in batches)
    ce_total, aux, z = 0.0, [], []
    for b in batches:
        ce = cross_entropy_sum(twin(**model_inputs(b)), b["labels"]) / n
        stats = collect_router_stats(moe_layers(twin))
        (ce + stats.loss / len(batches)).backward()
        ce_total += float(ce.detach())
        aux.append(float(stats.aux))
        z.append(float(stats.z))
    assert abs(float(result.loss) - ce_total) <= 1e-6 * ce_total
    assert abs(float(result.moe["moe_aux_loss"]) - sum(aux) / 3) <= 1e-6 * sum(aux) / 3
    assert abs(float(result.moe["moe_z_loss"]) - sum(z) / 3) <= 1e-6 * sum(z) / 3
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8), name
    router = model.blocks[0].ffn.router.weight.grad
    assert router is not None and router.abs().sum() > 0


def test_a_router_loss_carried_into_backward_gets_the_gradient_of_its_scaled_term():
    """With `router_loss_scale` = s (what the pipeline engine sets: only its last stage forms a loss), backward of the
    layer's output alone gives every parameter and the input the gradient of (out · up).sum() + s · loss; the
    output is unchanged, and without a gradient (evaluation) nothing is carried."""
    layer, twin = make_layer("swiglu", capacity_factor=1.0), make_layer("swiglu", capacity_factor=1.0)
    g = torch.Generator().manual_seed(3)
    x, up = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 5, 8, generator=g,
                                                                              dtype=torch.float64)
    layer.router_loss_scale = 0.25
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xa)
    (out * up).sum().backward()
    want = twin(xb)
    ((want * up).sum() + 0.25 * twin.last.loss).backward()
    assert torch.equal(out.detach(), want.detach())
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-12, atol=1e-14)
    for (name, p), q in zip(layer.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14), name
    assert layer.router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert layer(x).grad_fn is None


@pytest.mark.launches
def test_a_moe_run_resumes_exactly(tmp_path):
    """Steps 6-10 resumed from the step-5 checkpoint equal the straight run's (loss, grad_norm, router numbers)."""
    moe = ("model.moe.experts=4", "model.moe.capacity_factor=1.0", "model.moe.z_loss_coef=0.01", "train.steps=10",
           "checkpoint.every=5")
    straight, resumed = tmp_path / "straight" / "run", tmp_path / "resumed" / "run"
    single_process(tiny_overrides(straight, "causal", *moe))
    shutil.copytree(straight, resumed)  # then forget step 10: the run resumes from step 5
    shutil.rmtree(resumed / "checkpoints" / "step_00000010")
    (resumed / "checkpoints" / "latest").write_text("step_00000005\n")
    single_process(tiny_overrides(resumed, "causal", *moe))
    (a, _), (b, _) = read_metrics(straight), read_metrics(resumed)
    for step in range(6, 11):
        for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_dropped_fraction"):
            assert a[step][key] == b[step][key], (step, key)
