"""Log-likelihoods of continuations under a causal model (what lm-eval-harness asks of a model, without lm-eval).

For a context c_1..c_m and a continuation x_1..x_n, with z_t the logits after t tokens of c·x (over the model's
whole vocabulary, as the training loss):

    log p(x | c) = Σ_{i=1..n} log softmax(z_{m+i-1})[x_i]
    greedy       = every x_i is argmax_v z_{m+i-1}[v] over the tokenizer's ids (padding rows of the vocabulary are
                   never chosen, as in generation)

The model reads the last `max_len` tokens of c·x without its final token; rows of a batch are padded at the end,
which causal attention keeps from earlier positions, and to a multiple of `pad_multiple` (sequence parallelism).
`full_logits` gathers the vocabulary shards of a tensor-parallel model.
"""

from __future__ import annotations

import torch

from bigtrain.inference.decoder_rows import FullLogits
from bigtrain.inference.sampling import limit_vocab
from bigtrain.models import TransformerLM


def _window(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], int]:
    """(the input ids, the index of the logits that predict the first continuation token)."""
    if not context:
        raise ValueError("a continuation needs at least one context token (the caller puts eos before text that "
                         "starts a document)")
    if not 0 < len(continuation) <= max_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored by a model of "
                         f"{max_len} positions (model.max_seq_len); it needs 1 to {max_len} tokens")
    ids = (context + continuation)[-(max_len + 1):][:-1]
    return ids, len(ids) - len(continuation)


@torch.no_grad()
def continuation_logprobs(model: TransformerLM, pairs: list[tuple[list[int], list[int]]], *, pad_id: int,
                          vocab_limit: int | None = None, full_logits: FullLogits | None = None,
                          pad_multiple: int = 1, batch_size: int = 16) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) for each (context ids, continuation ids) pair, in order."""
    if model.family != "causal":
        raise ValueError(f"log-likelihoods of continuations need a causal model, not model.family={model.family}")
    max_len = model.cfg.max_seq_len // pad_multiple * pad_multiple
    device = next(model.parameters()).device
    windows = [_window(ctx, cont, max_len) for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(windows[i][0]))  # similar widths share a batch
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(windows[i][0]) for i in rows)
            width += -width % pad_multiple
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
            for r, i in enumerate(rows):
                ids[r, :len(windows[i][0])] = torch.tensor(windows[i][0], device=device)
            logits = model(ids)
            logits = (full_logits(logits) if full_logits is not None else logits).float()
            for r, i in enumerate(rows):
                first, targets = windows[i][1], pairs[i][1]
                z = logits[r, first:first + len(targets)]
                target = torch.tensor(targets, device=device)
                logprob = torch.log_softmax(z, -1).gather(-1, target[:, None]).sum().item()
                greedy = bool((limit_vocab(z, vocab_limit).argmax(-1) == target).all())
                out[i] = (logprob, greedy)
    finally:
        model.train(was_training)
    return out
