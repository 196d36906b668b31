"""Run under `torchrun --nproc_per_node 2`: generation through the tensor-parallel model (TP=2, gloo) against the
one-device model with the same weights. Every rank builds both (the shards are slices of the one-device
weights), generates from the same left-padded batch of prompts, and rank 0 writes one JSON line per case to the
file given as the first argument:

    greedy with the cache, greedy without it, greedy under sequence parallelism (recomputed, padded to the
    tensor size), and beam search with the cache: each the one-device model's tokens.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.inference.generate import Decoding, generate
from bigtrain.models import TransformerLM, build_model
from bigtrain.models.qkv import join_qkv, qkv_layout, split_qkv
from tests.helpers.tensor_parity import BASE, CASES, SEED, VOCAB, split

PROMPTS = [[5, 17, 33, 2, 60, 9], [40, 41], [7, 7, 12, 50]]
NEW, EOS, BOS = 12, 3, 1
GENERATION_CASES = ["causal", "causal-modern-gqa", "gpt2", "seq2seq", "t5"]


@torch.no_grad()
def lively(model: TransformerLM, seed: int = 0, std: float = 0.4) -> TransformerLM:
    """Redraw every matrix with a larger spread than the initialization's, so that a random model's next-token
    distributions are far from uniform and greedy / beam outputs vary from step to step (ties would make
    token-for-token comparisons meaningless)."""
    gen = torch.Generator().manual_seed(seed)
    head_dim, groups = qkv_layout(model.cfg)
    for name, p in model.named_parameters():
        if name.endswith("qkv_proj.weight"):  # drawn as Q, K, V apart (the separate linears of earlier bigtrains)
            parts = [torch.randn(t.shape, generator=gen) * std for t in split_qkv(p.detach(), head_dim, groups)]
            p.copy_(join_qkv(*parts, head_dim, groups))
        elif p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def run_case(name: str, groups: ParallelGroups) -> dict:
    overrides = CASES[name]
    full = lively(build_model(load_config(None, [*BASE, *overrides]).model, VOCAB, "cpu", seed=SEED))
    full_params = dict(full.named_parameters())
    kw = dict(eos_id=EOS, pad_id=0, bos_id=BOS)
    reference = generate(full, PROMPTS, NEW, **kw)
    reference_beam = generate(full, PROMPTS, NEW, Decoding(beams=3, length_penalty=0.7), **kw)
    record: dict = {"case": name, "reference": reference}
    for sp in (False, True):
        result = split(overrides, groups, f"parallel.sequence_parallel={sp}")
        with torch.no_grad():
            for n, p in result.model.named_parameters():
                p.copy_(result.shards[n].take(full_params[n]) if n in result.shards else full_params[n])
        model = result.model.eval()
        tp = dict(kw, full_logits=result.criterion.full_logits, pad_multiple=result.pad_multiple)
        if sp:
            record["sequence_parallel"] = generate(model, PROMPTS, NEW, **tp)
            continue
        record["cached"] = generate(model, PROMPTS, NEW, **tp)
        record["uncached"] = generate(model, PROMPTS, NEW, use_cache=False, **tp)
        record["beam"] = generate(model, PROMPTS, NEW, Decoding(beams=3, length_penalty=0.7), **tp)
        record["reference_beam"] = reference_beam
    return record


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    layout = Layout.for_world(tensor=2, pipeline=1, world_size=dist.get_world_size())
    groups = ParallelGroups(layout, dist.get_rank())
    records = [run_case(name, groups) for name in GENERATION_CASES]
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
