"""The rows being generated and the logits of their next token, with a KV cache or by full recomputation.

    causal   prompts left-padded to one width; attention_mask marks real tokens and position_ids = cumsum(mask)-1,
             so a padded row computes what it computes alone. Beyond model.max_seq_len the context is the last
             window of tokens (recomputed each step: the cache cannot slide absolute positions).
    seq2seq  sources right-padded and encoded once; every decoder row starts from bos.

With a cache only the new tokens go through the model; without one (or under sequence parallelism, where a
sequence must be a multiple of the tensor size) the whole context is recomputed, padded at the end to
`pad_multiple` (causal attention leaves earlier positions unaffected). `reorder(rows)` keeps row rows[i] as row
i (beam re-ranking, dropping finished rows). Logits come back as float32 over the whole vocabulary
(`full_logits` gathers vocabulary shards under tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bigtrain.models import CausalLM, Seq2SeqLM

FullLogits = Callable[[torch.Tensor], torch.Tensor]


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only: cumsum(mask) - 1, clamped at 0 on left padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _pad_end(ids: torch.Tensor, mask: torch.Tensor, multiple: int, pad_id: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    extra = -ids.shape[1] % multiple
    if not extra:
        return ids, mask
    return (torch.cat([ids, ids.new_full((ids.shape[0], extra), pad_id)], 1),
            torch.cat([mask, mask.new_zeros((mask.shape[0], extra))], 1))


class CausalRows:
    """Left-padded rows of a decoder-only model."""

    def __init__(self, model: CausalLM, prompts: list[list[int]], pad_id: int, use_cache: bool = True,
                 pad_multiple: int = 1, full_logits: FullLogits | None = None) -> None:
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        self.model, self.pad_id, self.pad_multiple = model, pad_id, pad_multiple
        self.full_logits = full_logits or _identity
        self.window = model.cfg.max_seq_len // pad_multiple * pad_multiple
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
        self.mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        self.padded = bool((~self.mask).any())
        self.cache = model.new_cache() if use_cache and pad_multiple == 1 and width <= self.window else None
        self.fed = 0  # columns of `ids` already in the cache

    def append(self, tokens: torch.Tensor) -> None:
        """Add one token [R] to every row."""
        self.ids = torch.cat([self.ids, tokens[:, None].to(self.ids)], 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], 1)

    def reorder(self, rows: torch.Tensor) -> None:
        self.ids, self.mask = self.ids[rows], self.mask[rows]
        self.padded = bool((~self.mask).any())
        if self.cache is not None:
            self.cache.reorder(rows)

    def logits(self) -> torch.Tensor:
        """[R, V] float32 logits of the token after each row."""
        if self.cache is not None and self.ids.shape[1] > self.window:
            self.cache = None  # past the model's positions: recompute over the last window from here on
        if self.cache is None:
            return self._recompute()
        mask = self.mask if self.padded else None
        positions = positions_of(self.mask)[:, self.fed:] if self.padded else None
        out = self.model(self.ids[:, self.fed:], attention_mask=mask, position_ids=positions, cache=self.cache)
        self.fed = self.ids.shape[1]
        return self.full_logits(out[:, -1]).float()

    def _recompute(self) -> torch.Tensor:
        ids, mask = self.ids[:, -self.window:], self.mask[:, -self.window:]
        length = ids.shape[1]
        padded = bool((~mask).any())
        ids, mask = _pad_end(ids, mask, self.pad_multiple, self.pad_id)
        out = self.model(ids, attention_mask=mask if padded else None,
                         position_ids=positions_of(mask) if padded else None)
        return self.full_logits(out[:, length - 1]).float()


class Seq2SeqRows:
    """Encoder-decoder rows: the sources encoded once, decoders started from bos."""

    def __init__(self, model: Seq2SeqLM, sources: list[list[int]], pad_id: int, bos_id: int,
                 use_cache: bool = True, pad_multiple: int = 1, full_logits: FullLogits | None = None) -> None:
        device = next(model.parameters()).device
        width = max(len(s) for s in sources)
        self.model, self.pad_id, self.pad_multiple = model, pad_id, pad_multiple
        self.full_logits = full_logits or _identity
        ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in sources], device=device)
        mask = torch.tensor([[True] * len(s) + [False] * (width - len(s)) for s in sources], device=device)
        ids, mask = _pad_end(ids, mask, pad_multiple, pad_id)
        self.source_mask = mask if bool((~mask).any()) else None
        self.memory = model.encode(ids, self.source_mask)
        self.ids = torch.full((len(sources), 1), bos_id, dtype=torch.long, device=device)
        self.cache = model.new_cache() if use_cache and pad_multiple == 1 else None
        self.fed = 0

    def append(self, tokens: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, tokens[:, None].to(self.ids)], 1)

    def reorder(self, rows: torch.Tensor) -> None:
        self.ids, self.memory = self.ids[rows], self.memory[rows]
        if self.source_mask is not None:
            self.source_mask = self.source_mask[rows]
        if self.cache is not None:
            self.cache.reorder(rows)

    def logits(self) -> torch.Tensor:
        """[R, V] float32 logits of the next decoder token of each row."""
        if self.cache is not None:
            out = self.model.decode(self.ids[:, self.fed:], self.memory, self.source_mask, cache=self.cache)
            self.fed = self.ids.shape[1]
            return self.full_logits(out[:, -1]).float()
        length = self.ids.shape[1]
        ids, _ = _pad_end(self.ids, torch.ones_like(self.ids, dtype=torch.bool), self.pad_multiple, self.pad_id)
        out = self.model.decode(ids, self.memory, self.source_mask)
        return self.full_logits(out[:, length - 1]).float()


Rows = CausalRows | Seq2SeqRows
