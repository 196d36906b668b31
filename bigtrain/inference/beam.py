"""Beam search with the semantics of transformers' `generate(num_beams=B, do_sample=False)` (its `_beam_search`,
early_stopping=False, num_return_sequences=1), step for step, so that both choose the same tokens.

Per prompt, B running beams with scores s = Σ log p (float32; at the start beam 0 has 0, the others -1e9 so
that the first step expands one beam). Each step, with t tokens generated so far:

    1. candidates: the top 2B of the B·V sums s_b + log softmax(logits_b)_v
    2. a candidate is done if its token is EOS or t + 1 = max_new_tokens
    3. running beams: the top B candidates that are not done
    4. finished hypotheses: done candidates among the top B, scored s / (t + 1) ** length_penalty (the
       generated length, EOS included, prompt excluded), merged with the B best so far, keeping the best B
    5. a prompt stops accepting hypotheses once all B slots are finished and its best running score
       s_0 / (t + 1) ** length_penalty is no better than the worst finished one (transformers' heuristic)

and the search stops when no prompt can improve or every candidate is done. The answer is the best finished
hypothesis. Running beams are re-ranked by `reorder` (the KV cache follows).
"""

from __future__ import annotations

import torch

from bigtrain.inference.decoder_rows import Rows
from bigtrain.inference.sampling import limit_vocab

NEG = -1.0e9


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [P, K, ...] -> t[p, index[p, j], ...] for index [P, J]."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.no_grad()
def beam_search(rows: Rows, prompts: int, beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                eos_id: int | None = None, vocab_limit: int | None = None) -> list[list[int]]:
    """The best hypothesis of each of `prompts` prompts; `rows` holds prompts·beams rows, each prompt's beams
    adjacent (the prompt repeated). Returns the generated tokens (ending with EOS when one was generated)."""
    P, B, device = prompts, beams, rows.ids.device
    keep = 2 * B  # max(2, 1 + number of EOS ids) * B, as transformers keeps
    top_b = torch.arange(keep, device=device) < B
    running_scores = torch.zeros(P, B, device=device)
    running_scores[:, 1:] = NEG
    running = torch.zeros(P, B, 0, dtype=torch.long, device=device)
    finished = torch.zeros(P, B, max_new_tokens, dtype=torch.long, device=device)
    finished_scores = torch.full((P, B), NEG, device=device)
    finished_lengths = torch.zeros(P, B, dtype=torch.long, device=device)
    is_finished = torch.zeros(P, B, dtype=torch.bool, device=device)
    improvable = torch.ones(P, 1, dtype=torch.bool, device=device)
    base = torch.arange(P, device=device)[:, None] * B
    for t in range(max_new_tokens):
        log_probs = limit_vocab(torch.log_softmax(rows.logits(), dim=-1), vocab_limit)
        vocab = log_probs.shape[-1]
        sums = (log_probs.view(P, B, vocab) + running_scores[:, :, None]).reshape(P, B * vocab)
        top_scores, top_index = torch.topk(sums, keep)
        source, token = top_index // vocab, top_index % vocab
        candidates = torch.cat([_gather(running, source), token[:, :, None]], dim=2)
        done = torch.full_like(token, t + 1 >= max_new_tokens, dtype=torch.bool)
        if eos_id is not None:
            done |= token == eos_id

        # running beams: the best B candidates not done
        next_index = torch.topk(top_scores + done.to(torch.float32) * NEG, B)[1]
        running = _gather(candidates, next_index)
        running_scores = _gather(top_scores + done.to(torch.float32) * NEG, next_index)
        rows_kept = (base + _gather(source, next_index)).flatten()

        # finished hypotheses: done candidates among the top B, with the length penalty
        just_done = done & top_b[None, :]
        scores = top_scores / ((t + 1) ** length_penalty)
        scores = scores + (~improvable).to(torch.float32) * NEG
        scores = scores + (~just_done) * NEG
        padded = torch.nn.functional.pad(candidates, (0, max_new_tokens - t - 1))
        merged = torch.topk(torch.cat([finished_scores, scores], 1), B)[1]
        finished = _gather(torch.cat([finished, padded], 1), merged)
        finished_lengths = _gather(torch.cat([finished_lengths, torch.full_like(token, t + 1)], 1), merged)
        is_finished = _gather(torch.cat([is_finished, just_done], 1), merged)
        finished_scores = _gather(torch.cat([finished_scores, scores], 1), merged)

        best_running = running_scores[:, :1] / ((t + 1) ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(done.all()):
            break
        rows.reorder(rows_kept)
        rows.append(running[:, :, -1].flatten())
    return [finished[p, 0, :int(finished_lengths[p, 0])].tolist() for p in range(P)]
