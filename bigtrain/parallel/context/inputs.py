"""What each rank of a context group feeds the model: its zig-zag share of every sequence of a micro-batch.

Every rank of a context group reads the same micro-batch (the data-parallel rank's), whole. `ContextInputs.split`
keeps this rank's tokens of every per-token tensor (`sharding.shard_sequence`: ids, labels, padding masks,
document ids, token types) and adds what the model cannot compute from a shard:

    position_ids   the global position of each kept token (`global_positions`); with document masking the
                   position within its document, computed on the whole sequence and then sharded
                   (`bigtrain.models.documents.document_positions`): rotary, learned and sinusoidal positions
                   then see exactly what one device sees
    tokens         every rank's `Tokens` (global positions, document ids, padding) per stack ("self" for a
                   decoder-only or encoder-only model; "encoder" and "decoder" for an encoder-decoder), which the
                   context-parallel attention cores (`core.py`) read to build their masks. Every rank holds the
                   whole micro-batch, so every rank's shard is computed locally: no communication

Labels are sharded like the tokens they predict (the causal shift was made on the whole sequence), so the
loss of a rank is Σ ce over its own targets and Σ over the context group is the micro-batch's Σ ce. The target
count N is taken on the host over the whole (unsplit) batch and summed over the data group only, never counted
once per context rank (`bigtrain.engine.step`).

A pipeline stage holds only hidden states of this rank's tokens: `enter` rebuilds the same tokens and position
inputs from its S/C tokens and the whole document ids and padding that travel with them, before each layer runs
(a pipeline schedule interleaves the micro-batches on a stage).

The tokens stay set from `split` until `clear` (after the micro-batches' backward: recomputed attention cores
read them again); with none set the cores run plain attention on what they are given, so sampling and
generation through the same model run on one rank's full sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bigtrain.models.documents import document_positions
from bigtrain.parallel.context.sharding import global_positions, shard_sequence
from bigtrain.parallel.context.tokens import Tokens

Batch = dict[str, torch.Tensor]
# model.family -> {input key: the stack whose sequence it belongs to}
STACKS = {
    "causal": {"input_ids": "self", "labels": "self", "document_ids": "self", "attention_mask": "self"},
    "masked": {"input_ids": "self", "labels": "self", "attention_mask": "self", "token_type_ids": "self"},
    "seq2seq": {"input_ids": "encoder", "attention_mask": "encoder", "decoder_input_ids": "decoder",
                "decoder_attention_mask": "decoder", "labels": "decoder"},
}
# stack -> (its padding mask key, the model's position input)
STACK_KEYS = {"self": ("attention_mask", "position_ids"), "encoder": ("attention_mask", "position_ids"),
              "decoder": ("decoder_attention_mask", "decoder_position_ids")}


class ContextInputs:
    """The zig-zag split of micro-batches over one context group, and the `Tokens` of the micro-batch being run
    (read by the attention cores that share this object)."""

    def __init__(self, group, family: str) -> None:
        if family not in STACKS:
            raise ValueError(f"model.family={family!r} has no context-parallel split; known: {sorted(STACKS)}")
        self.group, self.family = group, family
        self.size, self.rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        self.tokens: dict[str, list[Tokens]] | None = None

    @property
    def active(self) -> bool:
        return self.tokens is not None

    def split(self, batch: Batch) -> Batch:
        """This rank's share of `batch` (whole sequences, the same on every rank of the group) with its position
        inputs; every rank's `Tokens` set for the attention cores."""
        stacks = STACKS[self.family]
        unknown = set(batch) - set(stacks)
        if unknown:
            raise ValueError(f"context parallelism does not know how to split batch keys {sorted(unknown)}")
        local: Batch = {key: shard_sequence(value, self.size, self.rank) for key, value in batch.items()}
        tokens: dict[str, list[Tokens]] = {}
        device = next(iter(batch.values())).device
        for stack in sorted(set(stacks[key] for key in batch)):
            length = next(batch[k].shape[1] for k in batch if stacks[k] == stack)
            padding_key, position_key = STACK_KEYS[stack]
            padding = batch.get(padding_key) if stacks.get(padding_key) == stack else None
            documents = batch.get("document_ids") if stack == "self" else None
            tokens[stack] = [self._tokens(length, r, documents, padding, device) for r in range(self.size)]
            if documents is not None:
                local[position_key] = shard_sequence(document_positions(documents), self.size, self.rank)
            else:
                local[position_key] = tokens[stack][self.rank].positions[None, :]
        self.tokens = tokens
        return local

    def _tokens(self, length: int, rank: int, documents: torch.Tensor | None, padding: torch.Tensor | None,
                device: torch.device) -> Tokens:
        """Rank `rank`'s tokens of a stack of `length` tokens."""
        return Tokens(global_positions(length, self.size, rank, device),
                      None if documents is None else shard_sequence(documents, self.size, rank),
                      None if padding is None else shard_sequence(padding, self.size, rank).bool())

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor [B, S, ...]."""
        return shard_sequence(t, self.size, self.rank)

    def enter(self, local_length: int, document_ids: torch.Tensor | None = None,
              key_padding: torch.Tensor | None = None, device: torch.device | None = None) -> Batch:
        """A pipeline stage's view of the micro-batch it is about to run (one stack, "self": the causal and
        masked families). The stage holds this rank's `local_length` = S/C tokens and, whole, the document ids
        [B, S] and padding mask [B, S] that travel with them between stages; every rank's `Tokens` are set for
        the attention cores (computed locally, no communication) and this rank's position inputs returned:
        {"position_ids" (global, or within its document), "document_ids" and "attention_mask" (this rank's
        share; where given)}."""
        full = local_length * self.size
        docs = None if document_ids is None else document_ids.to(torch.int64)
        padding = None if key_padding is None else key_padding.bool()
        where = next((t.device for t in (docs, padding) if t is not None), device)
        self.tokens = {"self": [self._tokens(full, r, docs, padding, where) for r in range(self.size)]}
        local: Batch = {"position_ids": self.tokens["self"][self.rank].positions[None, :]}
        if docs is not None:
            local["position_ids"] = self.shard(document_positions(docs))
            local["document_ids"] = self.shard(docs)
        if padding is not None:
            local["attention_mask"] = self.shard(padding)
        return local

    def of(self, stack: str) -> list[Tokens]:
        """Every rank's tokens of `stack` in the micro-batch being run."""
        assert self.tokens is not None, "no context-parallel micro-batch is being run"
        return self.tokens[stack]

    def clear(self) -> None:
        """After a micro-batch (or a step's micro-batches) is done: the cores run plain attention again."""
        self.tokens = None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over the context group (a copy; evaluation's per-rank sums)."""
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t
