"""How one next token is chosen from the logits of each row: greedy, or a draw after temperature, top-k and top-p
(applied in that order, as transformers' logits warpers do)."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def limit_vocab(scores: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """scores [R, V] with ids >= vocab_limit (padding rows of the embedding) set to -inf, so never chosen."""
    if vocab_limit is None or vocab_limit >= scores.shape[-1]:
        return scores
    return scores.index_fill(-1, torch.arange(vocab_limit, scores.shape[-1], device=scores.device), NEG_INF)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th), -inf elsewhere."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most probable tokens whose probabilities sum to at least p (always the top one).

    With ascending sort and cumulative probability c_i, token i goes when c_i <= 1 - p (transformers' rule)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), NEG_INF)


def sample_tokens(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One draw per row from softmax(filter(logits / temperature)); logits [R, V] -> ids [R]. Draws on the
    generator's device (the CPU), so a seed gives the same tokens wherever the model runs."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(-1).to(generator.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)
