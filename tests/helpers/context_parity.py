"""Spawned by tests/test_context_parallel.py (torch.multiprocessing, gloo, C ranks = one context group): ring and
Ulysses attention on this rank's zig-zag shard against one device's attention over the full sequence.

Every rank draws the same full q, k, v and upstream gradient from one seed; the reference is torch's
scaled_dot_product_attention (fp32) with `bigtrain.models.attention.build_mask`'s mask over the whole sequence,
and its output and q/k/v gradients are sharded the way the inputs are. Errors are relative to the reference's
largest magnitude and reduced with MAX over the group; rank 0 writes one JSON line per (case, algorithm), and a
memory line: peak live bytes during forward + backward (torch profiler's allocation events) and the bytes saved
for backward, of one attention call on this rank's shard, with C and with a one-rank group (C = 1).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from bigtrain.compat.torch import sdpa
from bigtrain.models.attention import build_mask
from bigtrain.parallel.context import (
    Tokens,
    gather_tokens,
    global_positions,
    ring_attention,
    shard_sequence,
    ulysses_attention,
    unshard_sequence,
)
from bigtrain.planning.saved_activations import SavedActivationMeter

B, S, D = 2, 32, 16
# name: (causal, query heads, key/value heads, documents, padded length of row 1 (None: no padding), scale)
CASES = {
    "causal": (True, 4, 4, False, None, None),
    "bidirectional": (False, 4, 4, False, None, None),
    "documents": (True, 4, 4, True, None, None),
    "documents-padding": (True, 4, 4, True, 21, None),
    "causal-padding": (True, 4, 4, False, 19, None),
    "bidirectional-padding": (False, 4, 4, False, 21, None),
    "bidirectional-unscaled": (False, 4, 4, False, 27, 1.0),
    "gqa": (True, 8, 4, False, None, None),
    "gqa-documents": (True, 8, 4, True, None, None),
    "gqa-ring-6-over-2": (True, 6, 2, True, None, None),  # heads no multiple of C = 4: ring only
}
# Document boundaries (first token of each new document) per batch row: they cross the chunks of C = 2 (16
# tokens a rank, chunks of 8) and C = 4 (chunks of 4).
BOUNDARIES = ([5, 13, 22], [3, 17, 18, 30])
HEADS = 4  # of the memory check
ALGORITHMS = {"ring": ring_attention, "ulysses": ulysses_attention}


def full_inputs(heads: int, kv_heads: int, documents: bool, real: int | None) -> dict[str, torch.Tensor | None]:
    """The whole-sequence tensors of one case, the same on every rank."""
    g = torch.Generator().manual_seed(1234 + heads * 10 + kv_heads)
    q = torch.randn(B, heads, S, D, generator=g)
    k, v = (torch.randn(B, kv_heads, S, D, generator=g) for _ in range(2))
    d_out = torch.randn(B, heads, S, D, generator=g)
    docs = None
    if documents:
        starts = torch.zeros(B, S, dtype=torch.int64)
        for row, cuts in enumerate(BOUNDARIES):
            starts[row, cuts] = 1
        docs = starts.cumsum(-1)
    padding = None
    if real is not None:
        padding = torch.ones(B, S, dtype=torch.bool)
        padding[1, real:] = False
        if docs is not None:
            docs = docs.masked_fill(~padding, -1)  # as collate pads document ids
    return {"q": q, "k": k, "v": v, "d_out": d_out, "docs": docs, "padding": padding}


def reference(x: dict, causal: bool, scale: float | None) -> dict[str, torch.Tensor]:
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    mask = build_mask(S, x["padding"], causal, q.device, document_ids=x["docs"])
    out = sdpa(q, k, v, mask, 0.0, is_causal=causal and mask is None, scale=scale)
    out.backward(x["d_out"])
    return {"out": out.detach(), "q": q.grad, "k": k.grad, "v": v.grad}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def shard_tokens(x: dict, context: int, rank: int) -> Tokens:
    return Tokens(global_positions(S, context, rank),
                  None if x["docs"] is None else shard_sequence(x["docs"], context, rank),
                  None if x["padding"] is None else shard_sequence(x["padding"], context, rank))


def compare(name: str, algorithm: str, group, context: int, rank: int, dtype: torch.dtype = torch.float32,
            pregathered: bool = False) -> dict:
    """One case: errors of the output and of dq, dk, dv. In bf16 the reference (fp32) takes the same rounded
    inputs, so what is left is the rounding of the outputs and gradients to bf16; in fp64 the reference is
    fp64 too, so what is left is the algorithm's own error."""
    causal, heads, kv_heads, documents, real, scale = CASES[name]
    x = full_inputs(heads, kv_heads, documents, real)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    x.update({n: x[n].to(dtype).to(wide) for n in ("q", "k", "v", "d_out")})
    ref = reference(x, causal, scale)
    local = {n: shard_sequence(x[n], context, rank, dim=2).to(dtype).requires_grad_() for n in "qkv"}
    tokens = shard_tokens(x, context, rank)
    if pregathered:  # every rank's tokens, gathered once (per batch) instead of inside each call
        tokens = gather_tokens(tokens, group)
    out = ALGORITHMS[algorithm](local["q"], local["k"], local["v"], tokens, group, causal, scale)
    out.backward(shard_sequence(x["d_out"], context, rank, dim=2).to(dtype))
    assert out.dtype == dtype and all(local[n].grad.dtype == dtype for n in "qkv")
    got = [out.detach(), *(local[n].grad for n in "qkv")]
    errors = torch.tensor([relative(a.to(wide), shard_sequence(ref[n], context, rank, dim=2))
                           for a, n in zip(got, ["out", *"qkv"], strict=True)], dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX, group=group)
    return {"case": name, "algorithm": algorithm, "context": context, "dtype": str(dtype).removeprefix("torch."),
            "pregathered": pregathered,
            **dict(zip(["out", "dq", "dk", "dv"], errors.tolist(), strict=True))}


def peak_live_bytes(fn) -> int:
    """The highest sum of live allocations (bytes) while fn runs, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def memory(algorithm: str, group, seq: int, context: int, rank: int) -> dict[str, int]:
    """Peak live and saved bytes of one causal attention call (forward + backward) over this rank's shard."""
    g = torch.Generator().manual_seed(7)
    q, k, v, d_out = (shard_sequence(torch.randn(1, HEADS, seq, 32, generator=g), context, rank, dim=2)
                      for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    tokens = Tokens(global_positions(seq, context, rank))
    meter = SavedActivationMeter(torch.nn.Module())

    def step() -> None:
        with meter.measuring():
            out = ALGORITHMS[algorithm](q, k, v, tokens, group, True, None)
        out.backward(d_out)

    step()  # warm up (first-call allocations of the kernels and the profiler)
    meter = SavedActivationMeter(torch.nn.Module())
    peak = min(peak_live_bytes(step) for _ in range(2))  # the lower of two: a gloo thread's buffers may overlap
    return {"peak_live": peak, "saved": meter.peak}


def main(rank: int, world: int, port: int, out_path: str, memory_seq: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank takes part in every new_group
    records = []
    for name, (_, heads, kv_heads, *_rest) in CASES.items():
        for algorithm in ALGORITHMS:
            if algorithm == "ulysses" and (heads % world or kv_heads % world):
                continue
            records += [compare(name, algorithm, group, world, rank, dtype) for dtype in (torch.float32, torch.float64)]
    records += [compare("gqa-documents", algorithm, group, world, rank, torch.bfloat16) for algorithm in ALGORITHMS]
    records += [compare("documents-padding", algorithm, group, world, rank, pregathered=True)
                for algorithm in ALGORITHMS]
    x = torch.randn(B, S, 3, generator=torch.Generator().manual_seed(5))
    back = unshard_sequence(shard_sequence(x, world, rank), group)
    back_heads = unshard_sequence(shard_sequence(x.transpose(1, 2), world, rank, dim=2), group, dim=2)
    records.append({"unshard": bool(torch.equal(back, x) and torch.equal(back_heads, x.transpose(1, 2)))})
    if memory_seq:
        for algorithm in ALGORITHMS:
            split, one = memory(algorithm, group, memory_seq, world, rank), memory(algorithm, alone, memory_seq, 1, 0)
            figures = torch.tensor([split["peak_live"], split["saved"]], dtype=torch.float64)
            dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=group)
            records.append({"memory": algorithm, "context": world, "seq": memory_seq,
                            "peak_live": int(figures[0]), "saved": int(figures[1]),
                            "peak_live_c1": one["peak_live"], "saved_c1": one["saved"],
                            "scores_c1": HEADS * memory_seq ** 2 * 4})  # one fp32 [S, S] per head
    if rank == 0:
        with open(out_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    dist.barrier(group=group)
    dist.destroy_process_group()

