"""Observability of mixture-of-experts training (issue 29 item 3): each MoE block's expert load, dropped fraction,
aux and z losses, from the step (against a count by hand of the routing) to metrics.jsonl (the README's fields),
TensorBoard (scalars per block and the expert-load image) and `bigtrain plot`'s heatmap. None of these launches a
process: the step runs in this one, and the training run is in-process (tests/test_expert_parallel.py compares
the counts of expert-parallel ranks with one device's)."""

from __future__ import annotations

import math

import pytest
import torch

from bigtrain.cli.plot import moe_load_path, run_plot
from bigtrain.config import ModelConfig, load_config
from bigtrain.config.schema import MoEConfig
from bigtrain.engine.result import resolve_all
from bigtrain.models.build import build_model
from bigtrain.models.moe import moe_layers
from bigtrain.train.metrics import MetricsProcessor
from bigtrain.train.moe_load import TAG, read_back
from bigtrain.train.trainer import train
from tests.conftest import read_metrics, tiny_overrides
from tests.test_docs_code import metrics_table
from tests.test_moe import _PlainSteps

TOP_K, EXPERTS = 2, 4


def hand_count(router: torch.Tensor, h: torch.Tensor, capacity: int) -> tuple[list[int], list[int], float]:
    """Token by token: the top-k experts of softmax(W_r h_t); each expert keeps assignments first choices first,
    then in token order, up to `capacity`. Returns (assigned, kept) per expert and the dropped fraction."""
    choices = [torch.topk(torch.softmax(router @ h[t], -1), TOP_K).indices.tolist() for t in range(h.shape[0])]
    assigned, kept = [0] * EXPERTS, [0] * EXPERTS
    for k in range(TOP_K):
        for t in range(h.shape[0]):
            e = choices[t][k]
            assigned[e] += 1
            kept[e] += assigned[e] <= capacity
    return assigned, kept, 1 - sum(kept) / sum(assigned)


def test_block_load_equals_a_count_by_hand_of_the_routing():
    """Three micro-batches through a 4-block model whose blocks 1 and 3 are MoE, with capacity dropping: each
    block's `assigned` and `kept` are the sums over the micro-batches of a count by hand from the block's inputs
    (Σ assigned = tokens · top_k, kept ≤ assigned), its dropped fraction the mean of the micro-batches', its aux
    and z the micro-batch means whose sums over blocks are the step's totals."""
    cfg = ModelConfig(d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=16, dropout=0.0,
                      moe=MoEConfig(experts=EXPERTS, top_k=TOP_K, every=2, capacity_factor=1.0, aux_loss_coef=0.5,
                                    z_loss_coef=0.1))
    model = build_model(cfg, 64, seed=3)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.mul_(8.0)  # an unbalanced router, so that the capacity drops assignments
    inputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for index, layer in enumerate(moe_layers(model)):
        layer.register_forward_pre_hook(lambda _, args, i=index: inputs[i].append(args[0].detach().reshape(-1, 16)))
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 9), generator=g)
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    result = resolve_all([_PlainSteps(model).train_step(batches, lr=0.0)])[0]
    layers = result.moe_layers.record()
    assert list(layers) == ["blocks.1", "blocks.3"]
    tokens = 3 * 2 * 8
    capacity = math.ceil(1.0 * 16 * TOP_K / EXPERTS)
    for index, (name, record) in enumerate(layers.items()):
        router = moe_layers(model)[index].router.weight.detach()
        counts = [hand_count(router, h, capacity) for h in inputs[index]]
        assigned = [sum(c[0][e] for c in counts) for e in range(EXPERTS)]
        kept = [sum(c[1][e] for c in counts) for e in range(EXPERTS)]
        print(f"{name}: assigned {record['assigned']}, kept {record['kept']}, dropped {record['dropped']:.4f}")
        assert record["assigned"] == assigned and record["kept"] == kept, (name, record, assigned, kept)
        assert sum(record["assigned"]) == tokens * TOP_K
        assert all(k <= a for k, a in zip(record["kept"], record["assigned"], strict=True))
        assert sum(kept) < sum(assigned)  # the capacity dropped some
        assert abs(record["dropped"] - sum(c[2] for c in counts) / 3) <= 1e-12
        assert abs(record["dropped"] - (1 - sum(kept) / sum(assigned))) <= 1e-12  # equal micro-batches
        assert record["load_max_over_mean"] == max(assigned) / (tokens * TOP_K / EXPERTS)
    for total, key, combine in (("moe_aux_loss", "aux", sum), ("moe_z_loss", "z", sum),
                                ("moe_dropped_fraction", "dropped", lambda v: sum(v) / len(v))):
        assert abs(result.moe[total] - combine([r[key] for r in layers.values()])) <= 1e-12 * result.moe[total]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A 2-step in-process run of the tiny MoE GPT (4 experts, top-2, capacity 1.0) in micro-batches of 4, with
    TensorBoard."""
    run_dir = tmp_path_factory.mktemp("moe-obs") / "run"
    train(load_config(None, tiny_overrides(run_dir, "causal", f"model.moe.experts={EXPERTS}",
                                           f"model.moe.top_k={TOP_K}", "model.moe.capacity_factor=1.0",
                                           "train.steps=2", "train.micro_batch_size=4", "log.tensorboard=true")))
    return run_dir


def test_training_lines_carry_the_documented_moe_fields(moe_run):
    """Every training line has README's training fields plus its MoE row's (`moe_layers` with the per-block fields
    it lists, no more, no fewer); each block counts every input position top_k times (the embedded corpus packs
    full blocks: positions = the step's tokens) and its dropped fraction is the share its capacity did not keep."""
    key_at = metrics_table()["mixture of experts (in training lines)"]
    top, per_block = key_at[:4], key_at[4:]
    assert top[-1] == "moe_layers"
    training, _ = read_metrics(moe_run)
    assert sorted(training) == [1, 2]
    previous_tokens = 0
    for record in training.values():
        assert set(record) == set(MetricsProcessor.TRAINING_FIELDS) | set(top), sorted(record)
        assert list(record["moe_layers"]) == ["blocks.0", "blocks.1"]
        step_tokens, previous_tokens = record["tokens"] - previous_tokens, record["tokens"]
        for block in record["moe_layers"].values():
            assert set(block) == set(per_block), sorted(block)
            assert len(block["assigned"]) == len(block["kept"]) == EXPERTS
            assert sum(block["assigned"]) == step_tokens * TOP_K
            assert all(k <= a for k, a in zip(block["kept"], block["assigned"], strict=True))
            assert abs(block["dropped"] - (1 - sum(block["kept"]) / sum(block["assigned"]))) <= 1e-12
        assert abs(record["moe_aux_loss"] - sum(b["aux"] for b in record["moe_layers"].values())) <= 1e-12


def test_tensorboard_gets_per_block_scalars_and_the_load_image(moe_run):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    events = EventAccumulator(str(moe_run / "tensorboard"), size_guidance={IMAGES: 0, SCALARS: 0}).Reload()
    training, _ = read_metrics(moe_run)
    for block in ("blocks.0", "blocks.1"):
        for key in ("aux", "z", "dropped", "load_max_over_mean"):
            scalars = events.Scalars(f"moe/{block}/{key}")
            assert [e.step for e in scalars] == [1, 2]
            assert [e.value for e in scalars] == pytest.approx([training[s]["moe_layers"][block][key] for s in (1, 2)],
                                                               rel=1e-6, abs=1e-7)
    images = events.Images(TAG)
    assert [i.step for i in images] == [1, 2] and all(i.width > 100 and i.height > 100 for i in images)


def test_plot_draws_the_expert_load_of_the_last_logged_step(moe_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert run_plot([str(moe_run), "--out", str(out)]) == 0
    assert out.is_file() and moe_load_path(out).name == "curves_moe_load.png"
    assert "expert load: " in capsys.readouterr().out
    drawn = read_back(moe_load_path(out))["runs"]
    last = read_metrics(moe_run)[0][2]["moe_layers"]
    assert [(r["name"], r["step"], r["layers"]) for r in drawn] == [("run", 2, ["blocks.0", "blocks.1"])]
    assert drawn[0]["shares"] == [[last[b]["assigned"][e] / sum(last[b]["assigned"]) for b in last]
                                  for e in range(EXPERTS)]


def test_plot_of_a_dense_run_draws_no_expert_load(tmp_path):
    run_dir = tmp_path / "dense"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    out = tmp_path / "curves.png"
    assert run_plot([str(run_dir), "--out", str(out)]) == 0
    assert out.is_file() and not moe_load_path(out).exists()
