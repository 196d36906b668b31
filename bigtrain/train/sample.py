"""The sample a causal run prints when it ends: train.sample_tokens tokens after train.sample_prompt, drawn
(temperature 0.8, top-k 40, seed train.seed) through the engine's model with the KV cache; under sequence
parallelism by recomputation (lengths a multiple of the tensor size). Every rank runs it (a sharded model needs
all of them); rank 0 prints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.inference.generate import Decoding, generate


def print_sample(cfg: Config, layout: Layout, model: torch.nn.Module, tokenizer: Tokenizer,
                 full_logits: Callable[[torch.Tensor], torch.Tensor], pad_multiple: int, is_main: bool) -> None:
    t = cfg.train
    if cfg.model.family != "causal" or not t.sample_tokens:
        return
    if layout.pipeline > 1:
        if is_main:
            print("--- no sample: sampling through pipeline stages is not supported yet (consolidate the "
                  "checkpoint and sample on one device) ---", flush=True)
        return
    # An empty prompt samples the start of a document: the context is the end-of-document token.
    prompt = tokenizer.encode(t.sample_prompt) or [tokenizer.eos_id]
    new = generate(model, [prompt], t.sample_tokens, Decoding(temperature=0.8, top_k=40), seed=t.seed,
                   pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size, full_logits=full_logits,
                   pad_multiple=pad_multiple)[0]
    if is_main:
        print(f"--- sample ({t.sample_tokens} tokens after {t.sample_prompt!r}) ---\n"
              f"{tokenizer.decode(prompt + new)}\n---", flush=True)
