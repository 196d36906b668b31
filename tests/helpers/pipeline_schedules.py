"""Spawned by tests/test_pipeline_schedules.py: p gloo ranks run bigtrain models through each
`torch.distributed.pipelining` schedule (`bigtrain.parallel.schedules.PipelineRunner`) and compare with the unsplit
model on one process, built from the same seed on every rank:

  loss    the step's loss (on every rank) vs the unsplit model's mean over all target tokens
  grads   every parameter this rank holds (unsplit names) vs the unsplit model's gradient
  adamw   (optional) k AdamW steps of each rank's parameters vs k steps of the unsplit model: losses and weights
          (a `qkv_proj` bias by its Q, K and V rows, as `NAME:q_proj` …)
  tensor  (optional, world = 2 x pipeline) tensor parallelism inside each stage: the model rewritten by
          `apply_tensor_parallel` on the meta device, the vocabulary-parallel loss, sharded gradients gathered

Every rank writes one JSON line per case to `<out>.<rank>`.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.models import build_model
from bigtrain.models.build import materialize
from bigtrain.models.loss import cross_entropy_sum, model_inputs
from bigtrain.models.qkv import QKV_PARTS, qkv_layout, split_qkv
from bigtrain.parallel.schedules import PipelineRunner
from bigtrain.parallel.stages import model_parameters

VOCAB, SEED = 64, 1234
BASE = ["model.d_model=32", "model.n_layers=4", "model.n_heads=4", "model.d_ff=64", "model.max_seq_len=32",
        "model.dropout=0.0", f"model.vocab_size={VOCAB}", "data.seq_len=16"]
FAMILIES = {
    "causal": ["model.family=causal"],
    "causal-untied": ["model.family=causal", "model.tie_embeddings=false", "model.norm_position=pre",
                      "model.positions=learned"],
    "masked": ["model.family=masked", "model.positions=learned", "model.activation=gelu", "model.head_bias=true",
               "model.head_transform=true"],
    "seq2seq": ["model.family=seq2seq", "model.n_layers=2", "model.n_decoder_layers=2"],
    "t5": ["model.family=seq2seq", "model.n_layers=2", "model.norm_position=pre", "model.norm=rmsnorm",
           "model.positions=relative", "model.relative_buckets=8", "model.relative_max_distance=16",
           "model.bias=false", "model.scale_attention=false", "model.scale_tied_output=true"],
}


def batch_for(family: str, rows: int, seed: int, seq: int = 12) -> dict[str, torch.Tensor]:
    """`rows` sequences; padded families get rows of different lengths (so micro-batches hold different target
    counts and the mean of per-micro-batch means would differ from the global mean)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=gen)
    labels = torch.randint(0, VOCAB, (rows, seq), generator=gen)
    lengths = torch.randint(seq // 3, seq + 1, (rows,), generator=gen)
    lengths[0] = seq
    mask = torch.arange(seq) < lengths[:, None]
    if family == "causal":
        labels[0, :5] = -100
        # packed documents (`data.document_masking`): each row cut at two random points
        cuts = torch.randint(1, seq, (rows, 2), generator=gen)
        docs = (torch.arange(seq) >= cuts[:, :1]).long() + (torch.arange(seq) >= cuts[:, 1:]).long()
        return {"input_ids": ids, "labels": labels, "document_ids": docs}
    labels = labels.masked_fill(~mask, -100)
    if family == "masked":
        labels[:, ::2] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    dec_len = seq - 4
    dec = torch.randint(0, VOCAB, (rows, dec_len), generator=gen)
    dec_mask = torch.arange(dec_len) < (lengths - 2).clamp(1, dec_len)[:, None]
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": dec_mask,
            "labels": torch.randint(0, VOCAB, dec.shape, generator=gen).masked_fill(~dec_mask, -100)}


def reference_loss(model, batch) -> torch.Tensor:
    logits = model(**model_inputs(batch))
    return cross_entropy_sum(logits, batch["labels"]) / int((batch["labels"] != -100).sum())


def rel(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=floor))


def gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def tensor_split(meta, tensor: int):
    """(shards, loss_sum, groups) of `meta` rewritten for tensor parallelism over `tensor` ranks (world = tensor x
    pipeline, Megatron's rank order), or ({}, the plain loss, None)."""
    if tensor == 1:
        return {}, cross_entropy_sum, None
    from bigtrain.config.layout import Layout
    from bigtrain.distributed.groups import ParallelGroups
    from bigtrain.parallel.cross_entropy import VocabParallelCriterion
    from bigtrain.parallel.tensor import apply_tensor_parallel
    from bigtrain.parallel.tensor_layers import TensorParallel

    layout = Layout.for_world(tensor, dist.get_world_size() // tensor, dist.get_world_size(), engine="pipeline")
    groups = ParallelGroups(layout, dist.get_rank())
    tp = TensorParallel(groups.tensor_group, groups.get_tensor_model_parallel_rank(), tensor)
    shards = apply_tensor_parallel(meta, tp)
    return shards, VocabParallelCriterion(tp.group, tp.rank, tp.size).loss_sum, groups


def for_case(batch: dict[str, torch.Tensor], case: dict) -> dict[str, torch.Tensor]:
    """Document ids only where the case asks for document masking."""
    return batch if case.get("documents") else {k: v for k, v in batch.items() if k != "document_ids"}


def run_case(case: dict, group) -> dict:
    family_key, schedule, v, m = case["family"], case["schedule"], case["virtual_stages"], case["micro_batches"]
    cfg = load_config(None, [*BASE, *FAMILIES[family_key], *case.get("extra", [])]).model
    full = build_model(cfg, VOCAB, "cpu", seed=SEED)
    meta = build_model(cfg, VOCAB, "meta")
    shards, loss_sum, groups = tensor_split(meta, case.get("tensor", 1))
    if groups is not None:
        group = groups.group("pipeline")
    runner = PipelineRunner(meta, schedule, v, m, lambda piece: materialize(meta, "cpu", SEED, shards, piece=piece),
                            group=group, partition_method=case.get("partition", "parameters"), loss_sum=loss_sum,
                            documents=bool(case.get("documents")))
    if case.get("tied_group"):  # every rank creates the group (collective), the embedding's ranks use it
        runner.tied_group = dist.new_group(ranks=runner.stages.embed_ranks)
    mine = model_parameters(runner.modules)
    full_params = dict(full.named_parameters())

    def whole(name: str, t: torch.Tensor) -> torch.Tensor:
        return gather(t, shards[name].dim, groups.tensor_group) if name in shards else t

    init_exact = all(torch.equal(whole(n, p.detach()), full_params[n]) for n, p in mine.items())
    steps = case.get("adamw_steps", 0)
    rows = 2 * m
    if not steps:
        batch = for_case(batch_for(cfg.family, rows, seed=7), case)
        loss_ref = reference_loss(full, batch)
        loss_ref.backward()
        loss = runner.step(batch)
        floor = 1e-3 * max(float(p.grad.abs().max()) for p in full_params.values())
        grads = {n: rel(whole(n, p.grad), full_params[n].grad, floor) if p.grad is not None else float("inf")
                 for n, p in mine.items()}
        return {**case, "rank": dist.get_rank(), "init_exact": init_exact, "stages": runner.stages.indices,
                "bounds": runner.stages.bounds, "loss": float(loss), "loss_ref": float(loss_ref),
                "loss_rel": abs(float(loss) - float(loss_ref)) / abs(float(loss_ref)), "grads": grads,
                "names": sorted(mine), "all_names": sorted(full_params)}
    opt_ref = torch.optim.AdamW(full.parameters(), lr=3e-3, weight_decay=0.1)
    opt = torch.optim.AdamW(mine.values(), lr=3e-3, weight_decay=0.1)
    losses, losses_ref = [], []
    for k in range(steps):
        batch = for_case(batch_for(cfg.family, rows, seed=100 + k, seq=12 - 2 * (k % 3)), case)  # new shapes
        opt_ref.zero_grad(set_to_none=True)
        loss_ref = reference_loss(full, batch)
        loss_ref.backward()
        opt_ref.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(runner.step(batch)))
        opt.step()
        losses_ref.append(float(loss_ref))
    weights = {}
    for n, p in mine.items():
        ours, ref = whole(n, p.detach()), full_params[n].detach()
        if n.endswith("qkv_proj.bias"):  # by part: the K rows' true gradient is 0 (the test leaves them out)
            for part, a, b in zip(QKV_PARTS, split_qkv(ours, *qkv_layout(cfg)), split_qkv(ref, *qkv_layout(cfg)),
                                  strict=True):
                weights[f"{n}:{part}"] = rel(a, b, 1e-30)
        else:
            weights[n] = rel(ours, ref, 1e-30)
    return {**case, "rank": dist.get_rank(), "losses": losses, "losses_ref": losses_ref,
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, losses_ref, strict=True)),
            "weights": weights, "names": sorted(mine)}


def rank_main(rank: int, world: int, port: int, out: str, cases: list[dict]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with open(f"{out}.{rank}", "w") as f:
            for case in cases:
                try:
                    row = run_case(case, dist.group.WORLD)
                except Exception as error:  # reported per case; the other ranks may then hang: fail fast
                    row = {**case, "rank": rank, "error": f"{type(error).__name__}: {error}"}
                    f.write(json.dumps(row) + "\n")
                    raise
                f.write(json.dumps(row) + "\n")
                f.flush()
    finally:
        dist.destroy_process_group()
