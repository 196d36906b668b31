"""Text sampling from a causal LM (temperature + top-k), for the sample printed at the end of a run."""

from __future__ import annotations

import torch

from bigtrain.components.loss import Criterion
from bigtrain.models import CausalLM


@torch.no_grad()
def sample(model: CausalLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 40, seed: int = 0, vocab_limit: int | None = None,
           criterion: Criterion | None = None, pad_multiple: int = 1) -> list[int]:
    """Draw tokens one at a time from softmax(logits / temperature) restricted to the top k; the context
    is cropped to model.max_seq_len; ids >= vocab_limit (padding rows of the embedding) are never drawn.
    Under sequence parallelism the context is padded at the end to a multiple of `pad_multiple` (causal
    attention keeps earlier positions unaffected). Returns prompt + new tokens."""
    criterion = criterion or Criterion()
    window = model.cfg.max_seq_len // pad_multiple * pad_multiple
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = ids[-window:]
        padded = context + [0] * (-len(context) % pad_multiple)
        logits = model(torch.tensor([padded], device=device))[:, len(context) - 1]
        logits = criterion.full_logits(logits)[0].float().cpu() / max(temperature, 1e-6)
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        if top_k is not None and top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        ids.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
    model.train(was_training)
    return ids
