"""Stack samples into a batch, padding each field to the longest sample (dynamic padding).

Inputs are padded with pad_id, labels with -100 (ignored by the loss). Padded families also get
boolean attention masks, True at real tokens. Causal samples with "document_ids" (data.document_masking) keep
them, padded with -1: padding forms a document of its own.
"""

from __future__ import annotations

import torch

from bigtrain.errors import DataError
from bigtrain.models.loss import IGNORE_INDEX

PAD_DOCUMENT = -1


def pad_stack(seqs: list[torch.Tensor], value: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded [B, T] int64, mask [B, T] bool) for 1-D tensors, T = the longest length rounded up to a
    multiple of `multiple` (sequence parallelism cuts T into equal shards)."""
    sizes = [len(s) for s in seqs]
    width = -(-max(sizes) // multiple) * multiple
    if min(sizes) == width:  # nothing to pad (fixed-length causal blocks): one stack, no per-row copies
        out = torch.stack(seqs).long()
        return out, torch.ones(out.shape, dtype=torch.bool)
    lengths = torch.tensor(sizes)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, seq in zip(out, seqs, strict=True):
        row[:len(seq)] = seq
    return out, torch.arange(out.shape[1]) < lengths[:, None]


def collate(samples: list[dict], family: str, pad_id: int, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """The batch of `samples` for model.family `family`; lengths padded to a multiple of `pad_multiple`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    def field(name: str) -> list[torch.Tensor]:
        return [s[name] for s in samples]

    input_ids, attention_mask = pad_stack(field("input_ids"), pad_id, pad_multiple)
    labels, _ = pad_stack(field("labels"), IGNORE_INDEX, pad_multiple)
    if family == "causal":
        if "document_ids" not in samples[0]:
            return {"input_ids": input_ids, "labels": labels}
        document_ids, _ = pad_stack(field("document_ids"), PAD_DOCUMENT, pad_multiple)
        return {"input_ids": input_ids, "labels": labels, "document_ids": document_ids}
    if family == "masked":
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if family == "seq2seq":
        decoder_input_ids, decoder_attention_mask = pad_stack(field("decoder_input_ids"), pad_id, pad_multiple)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask,
                "labels": labels}
    raise DataError(f"model.family: unknown family '{family}'; expected 'causal', 'masked' or 'seq2seq'.")
