"""Greedy generation with and without the KV cache on the CPU: a GPT-2-shaped model (pre-norm, learned positions,
tanh GELU, tied embeddings) at half GPT-2 small's width and depth, 512 new tokens after a 16-token prompt.

Without the cache step t runs the model over all prompt + t tokens (O(T) work per token, O(T²) in all); with it,
over the one new token against the cached keys and values. Prints tokens/s of both, whether they chose the same
tokens, and last `cache speedup R`; writes bench/results/generation.json.

Run: python bench/generation.py [--d-model 384 --layers 6 --heads 6 --new-tokens 512 --batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GPT2_SHAPE = ["model.family=causal", "model.norm_position=pre", "model.positions=learned",
              "model.activation=gelu_tanh", "model.scale_embeddings=false", "model.tie_embeddings=true",
              "model.dropout=0.0"]


def timed(fn) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=50304, help="GPT-2's 50257 ids padded to a multiple of 64")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="prompts generated together")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generation.json")
    args = parser.parse_args()

    import torch

    from bigtrain.config import load_config
    from bigtrain.inference.generate import generate
    from bigtrain.models import build_model, count_parameters

    length = args.prompt_tokens + args.new_tokens
    cfg = load_config(None, [*GPT2_SHAPE, f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
                             f"model.n_heads={args.heads}", f"model.d_ff={4 * args.d_model}",
                             f"model.max_seq_len={length}", f"data.seq_len={min(128, length)}"]).model
    model = build_model(cfg, args.vocab, "cpu", seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens), generator=gen).tolist()
    generate(model, prompts, 8)  # warm-up: allocator, kernels
    generate(model, prompts, 8, use_cache=False)
    cached, cached_s = timed(lambda: generate(model, prompts, args.new_tokens))
    recomputed, recomputed_s = timed(lambda: generate(model, prompts, args.new_tokens, use_cache=False))
    tokens = args.batch * args.new_tokens
    same = cached == recomputed
    first_difference = next((i for i, (a, b) in enumerate(zip(cached[0], recomputed[0], strict=True)) if a != b),
                            None)
    n_params = count_parameters(model)
    print(f"{n_params / 1e6:.1f}M parameters (d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}), "
          f"batch {args.batch}, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens greedy, fp32, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"with cache:    {cached_s:7.2f} s  {tokens / cached_s:8.1f} tokens/s")
    print(f"without cache: {recomputed_s:7.2f} s  {tokens / recomputed_s:8.1f} tokens/s")
    print(f"same tokens: {same}" + ("" if same else f" (first difference at new token {first_difference})"))
    speedup = recomputed_s / cached_s
    result = {"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "model": {"n_params": n_params, "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                        "vocab": args.vocab},
              "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "cached": {"seconds": cached_s, "tokens_per_s": tokens / cached_s},
              "recomputed": {"seconds": recomputed_s, "tokens_per_s": tokens / recomputed_s},
              "same_tokens": same, "cache_speedup": speedup}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    print(f"cache speedup {speedup:.1f}")


if __name__ == "__main__":
    main()
