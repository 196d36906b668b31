"""Run under `torchrun --nproc_per_node 2`: document masking under tensor parallelism (and sequence parallelism)
against the unsplit model. Every rank builds both from the same seed and runs one packed batch with document
ids; rank 0 writes one JSON line per case (max |difference| of the gathered logits and of every gradient, each
over the largest reference value) to the file given as the first argument.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.models import build_model
from bigtrain.models.loss import Criterion, model_inputs
from bigtrain.parallel import parallelize

VOCAB, SEED = 64, 1234
BASE = ["model.family=causal", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
        "model.max_seq_len=32", "model.dropout=0.0", f"model.vocab_size={VOCAB}", "data.seq_len=12",
        "data.document_masking=true"]
CASES = {
    "learned": ["model.positions=learned"],
    "rotary-gqa": ["model.norm_position=pre", "model.norm=rmsnorm", "model.positions=rotary",
                   "model.activation=swiglu", "model.n_kv_heads=2", "model.tie_embeddings=false"],
}


def packed_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    lengths = [[3, 5, 4], [1, 8, 3]]
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])
    return {"input_ids": torch.randint(0, VOCAB, (2, 12), generator=gen),
            "labels": torch.randint(0, VOCAB, (2, 12), generator=gen), "document_ids": docs}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def compare(name: str, overrides: list[str], sequence_parallel: bool, groups: ParallelGroups) -> dict:
    full = build_model(load_config(None, [*BASE, *overrides]).model, VOCAB, "cpu", seed=SEED)
    cfg = load_config(None, [*BASE, *overrides, f"train.seed={SEED}", "parallel.tensor=2",
                             f"parallel.sequence_parallel={sequence_parallel}"], world_size=2)
    result = parallelize(build_model(cfg.model, VOCAB, "meta"), cfg, groups, "cpu")
    batch = packed_batch()
    logits_ref = full(**model_inputs(batch))
    Criterion().loss_sum(logits_ref, batch["labels"]).backward()
    logits = result.model(**model_inputs(batch))
    result.criterion.loss_sum(logits, batch["labels"]).backward()
    reference = dict(full.named_parameters())
    floor = 1e-3 * max(float(p.grad.abs().max()) for p in reference.values())
    grads = 0.0
    for n, p in result.model.named_parameters():
        g = gather(p.grad, result.shards[n].dim, groups.tensor_group) if n in result.shards else p.grad
        want = reference[n].grad
        grads = max(grads, float((g - want).abs().max()) / max(floor, float(want.abs().max())))
    return {"case": name, "sequence_parallel": sequence_parallel,
            "logits": rel(result.criterion.full_logits(logits), logits_ref), "grads": grads}


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    groups = ParallelGroups(Layout.for_world(tensor=2, pipeline=1, world_size=dist.get_world_size()),
                            dist.get_rank())
    results = [compare(name, overrides, sp, groups) for sp in (False, True) for name, overrides in CASES.items()]
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
