"""Run under `torchrun --nproc_per_node 2`: the tensor-parallel model against the unsplit one, in one process
group of 2 ranks (gloo). Every rank builds both from the same seed, runs the same batch, and compares:

  init       every shard equals the slice of the unsplit parameter (bitwise)
  logits     gathered vocabulary shards vs unsplit logits; predictions (global argmax)
  loss       vocabulary-parallel cross-entropy vs torch's
  grads      every gradient, sharded ones gathered along their split dimension; the global gradient norm
             and the norm of each piece (embed, every block, head) from the shards
  dropout    replicated regions: same mask on both ranks and as the unsplit model; sharded regions: a
             different mask per rank; activation checkpointing replays the masks
  structure  the parallel modules are visible in print(model), parameter names are the unsplit model's, and
             a copy.deepcopy of the parallel model computes with its own weights

Rank 0 writes one JSON line per case to the file given as the first argument.
"""

from __future__ import annotations

import copy
import json
import re
import sys

import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.models import build_model
from bigtrain.models.inspect import per_layer_grad_norms
from bigtrain.models.loss import Criterion, model_inputs
from bigtrain.parallel import ParallelModel, parallelize
from bigtrain.parallel.grad_norm import global_grad_norm, piece_grad_norms

VOCAB, SEED = 64, 1234
BASE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.max_seq_len=32",
        "model.dropout=0.0", f"model.vocab_size={VOCAB}", "data.seq_len=16"]
MODERN = ["model.norm_position=pre", "model.norm=rmsnorm", "model.positions=rotary", "model.activation=swiglu",
          "model.n_kv_heads=2", "model.tie_embeddings=false", "model.bias=false"]
CASES = {
    "causal": ["model.family=causal"],
    "causal-modern-gqa": ["model.family=causal", *MODERN],
    "masked": ["model.family=masked", "model.positions=learned", "model.activation=gelu"],
    "seq2seq": ["model.family=seq2seq", "model.n_decoder_layers=3"],
    "seq2seq-modern": ["model.family=seq2seq", *MODERN],
    # the published architectures (issue 14): GPT-2, BERT, T5
    "gpt2": ["model.family=causal", "model.norm_position=pre", "model.positions=learned",
             "model.activation=gelu_tanh", "model.scale_embeddings=false"],
    "bert": ["model.family=masked", "model.positions=learned", "model.activation=gelu", "model.embedding_norm=true",
             "model.type_vocab_size=2", "model.head_transform=true", "model.head_bias=true",
             "model.scale_embeddings=false"],
    "t5": ["model.family=seq2seq", "model.norm_position=pre", "model.norm=rmsnorm", "model.positions=relative",
           "model.relative_buckets=8", "model.relative_max_distance=16", "model.bias=false",
           "model.scale_attention=false", "model.scale_tied_output=true", "model.scale_embeddings=false"],
}


def batch_for(family: str, gen: torch.Generator, batch: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    lengths = torch.tensor([seq, seq - 3, seq - 6])
    mask = torch.arange(seq) < lengths[:, None]
    if family == "causal":
        labels[0, :2] = -100
        return {"input_ids": ids, "labels": labels}
    labels = labels.masked_fill(~mask, -100)
    if family == "masked":
        labels[:, ::2] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    dec = torch.randint(0, VOCAB, (batch, seq - 4), generator=gen)
    dec_mask = torch.arange(seq - 4) < (lengths - 2).clamp(max=seq - 4)[:, None]
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": dec_mask, "labels": torch.randint(0, VOCAB, dec.shape, generator=gen)
            .masked_fill(~dec_mask, -100)}


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """max |a - b| / max |b|; `floor` bounds the denominator from below for tensors that are ~0."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=floor))


def gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def forward_loss(model, batch, criterion):
    logits = model(**model_inputs(batch))
    n = int((batch["labels"] != -100).sum())
    return logits, criterion.loss_sum(logits, batch["labels"]) / n


def split(overrides: list[str], groups: ParallelGroups, *parallel: str) -> ParallelModel:
    """The model of `overrides` through `parallelize` with parallel.tensor=2 (and the `parallel` keys given)."""
    cfg = load_config(None, [*BASE, *overrides, f"train.seed={SEED}", "parallel.tensor=2", *parallel],
                      world_size=2)
    return parallelize(build_model(cfg.model, VOCAB, "meta"), cfg, groups, "cpu")


def compare(name: str, overrides: list[str], sequence_parallel: bool, groups: ParallelGroups) -> dict:
    cfg = load_config(None, [*BASE, *overrides]).model
    full = build_model(cfg, VOCAB, "cpu", seed=SEED)
    result = split(overrides, groups, f"parallel.sequence_parallel={sequence_parallel}")
    sharded, plan, criterion = result.model, result.shards, result.criterion
    tp_group = groups.tensor_group
    full_params = dict(full.named_parameters())
    init_exact = all(torch.equal(p, plan[n].take(full_params[n]) if n in plan else full_params[n])
                     for n, p in sharded.named_parameters())

    batch = batch_for(cfg.family, torch.Generator().manual_seed(7))
    stack = sharded.stacks()[0]
    shapes: list[int] = []
    stack[0].register_forward_hook(lambda m, a, out: shapes.append(out.shape[1]))
    logits_ref, loss_ref = forward_loss(full, batch, Criterion())
    loss_ref.backward()
    logits, loss = forward_loss(sharded, batch, criterion)
    loss.backward()
    gathered = criterion.full_logits(logits)
    # Key-projection biases have an exactly zero true gradient (softmax ignores a shift common to all keys):
    # their entries are rounding noise, so every gradient is measured against at least 1e-3 of the largest.
    floor = 1e-3 * max(float(p.grad.abs().max()) for p in full_params.values())
    grads = {}
    for n, p in sharded.named_parameters():
        g = gather(p.grad, plan[n].dim, tp_group) if n in plan else p.grad
        grads[n] = rel(g, full_params[n].grad, floor)
    full_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in full_params.values()])))
    pieces_ref = per_layer_grad_norms(full)
    pieces = piece_grad_norms(sharded, groups)
    assert sorted(pieces) == sorted(pieces_ref), (sorted(pieces), sorted(pieces_ref))
    norm = float(global_grad_norm(sharded.parameters(), groups, logits.device))
    return {"case": name, "sequence_parallel": sequence_parallel, "init_exact": init_exact,
            "grad_norm": abs(norm - full_norm) / full_norm,
            "piece_norms": max(abs(pieces[k] - pieces_ref[k]) / pieces_ref[k] for k in pieces),
            "logits": rel(gathered, logits_ref), "loss": rel(loss.detach(), loss_ref.detach()),
            "predictions_equal": bool(torch.equal(criterion.predictions(logits), logits_ref.argmax(-1))),
            "grads": grads, "n_sharded": len(plan), "n_params": len(full_params),
            "local_logits_width": logits.shape[-1], "residual_tokens": shapes[0],
            "input_tokens": batch["input_ids"].shape[1]}


def dropout_checks(groups: ParallelGroups) -> dict:
    """Dropout 0.1 everywhere; TP=2 without sequence parallelism."""
    overrides = ["model.family=causal", "model.dropout=0.1"]
    cfg = load_config(None, [*BASE, *overrides]).model
    batch = batch_for("causal", torch.Generator().manual_seed(3))
    result = split(overrides, groups)
    sharded, criterion, group, size = result.model, result.criterion, groups.tensor_group, 2
    seen: dict[str, torch.Tensor] = {}
    sharded.embed.register_forward_hook(lambda m, a, out: seen.__setitem__("embed", out.detach()))
    sharded.blocks[0].ffn.dropout.register_forward_hook(
        lambda m, a, out: seen.update(ffn=((a[0] != 0) & (out == 0)).detach(), ffn_nonzero=(a[0] != 0)))
    torch.manual_seed(11)
    logits, loss = forward_loss(sharded, batch, criterion)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sharded.named_parameters()}
    embed_same = bool(torch.equal(*gather(seen["embed"][None], 0, group)))
    ffn_masks = gather(seen["ffn"][None], 0, group)
    ffn_differ = not torch.equal(ffn_masks[0], ffn_masks[1])
    hidden = sharded.blocks[0].ffn.dropout  # fraction dropped among nonzero (post-ReLU) units
    ffn_rate = float(ffn_masks.sum()) / max(1, int(seen["ffn_nonzero"].sum()) * size) if hidden else 0.0

    # The same run with full activation checkpointing: recomputation replays every mask.
    again = split(overrides, groups, "parallel.activation_checkpointing=full").model
    torch.manual_seed(11)
    _, loss_ckpt = forward_loss(again, batch, criterion)
    loss_ckpt.backward()
    ckpt_same = all(torch.equal(p.grad, grads[n]) for n, p in again.named_parameters())

    # Dropout only in replicated regions (embedding and residual): the unsplit model draws the same masks.
    full = build_model(cfg, VOCAB, "cpu", seed=SEED)
    only_replicated = split(overrides, groups).model
    for model in (full, only_replicated):
        for block in model.blocks:
            block.ffn.dropout.p = 0.0
            block.self_attn.dropout = 0.0
    torch.manual_seed(11)
    logits_ref, _ = forward_loss(full, batch, Criterion())
    torch.manual_seed(11)
    logits_rep, _ = forward_loss(only_replicated, batch, criterion)
    return {"case": "dropout", "embed_same_on_ranks": embed_same, "ffn_masks_differ": ffn_differ,
            "ffn_drop_rate": ffn_rate, "checkpoint_replays": ckpt_same,
            "replicated_like_unsplit": rel(criterion.full_logits(logits_rep), logits_ref)}


def structure_checks(groups: ParallelGroups) -> dict:
    """TP=2 with sequence parallelism: an encoder-decoder (LayerNorm, cross-attention) with full activation
    checkpointing, and a modern GPT (RMSNorm, SwiGLU, grouped-query) with selective checkpointing."""
    record: dict = {"case": "structure", "classes": [], "repr": [], "names_equal": [], "copy": []}
    for overrides, checkpointing in ((CASES["seq2seq"], "full"), (CASES["causal-modern-gqa"], "selective")):
        cfg = load_config(None, [*BASE, *overrides]).model
        result = split(overrides, groups, "parallel.sequence_parallel=true",
                       f"parallel.activation_checkpointing={checkpointing}")
        model = result.model
        record["repr"].append(repr(model))
        record["classes"].append(sorted(set(re.findall(r"\): (?:\d+ x )?([A-Za-z]+)\(", repr(model)))))
        record["names_equal"].append(sorted(model.state_dict()) == sorted(build_model(cfg, VOCAB, "meta").state_dict()))

        batch = batch_for(cfg.family, torch.Generator().manual_seed(5))
        twin = copy.deepcopy(model)
        out = model(**model_inputs(batch))
        same_at_first = torch.equal(twin(**model_inputs(batch)), out)
        storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shares_storage = any(p.untyped_storage().data_ptr() in storages for p in twin.parameters())
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(0.5)
        original_unchanged = torch.equal(model(**model_inputs(batch)), out)
        twin_changed = not torch.equal(twin(**model_inputs(batch)), out)
        loss = result.criterion.loss_sum(twin(**model_inputs(batch)), batch["labels"])
        loss.backward()
        grads_in_twin_only = all(p.grad is not None for p in twin.parameters()) and \
            all(p.grad is None for p in model.parameters())
        record["copy"].append({"same_at_first": same_at_first, "shares_storage": shares_storage,
                               "original_unchanged": original_unchanged, "copy_changed": twin_changed,
                               "grads_in_copy_only": grads_in_twin_only})
    return record


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    layout = Layout.for_world(tensor=2, pipeline=1, world_size=dist.get_world_size())
    groups = ParallelGroups(layout, dist.get_rank())
    results = []
    for sp in (False, True):
        for name, overrides in CASES.items():
            results.append(compare(name, overrides, sp, groups))
    results.append(dropout_checks(groups))
    results.append(structure_checks(groups))
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
