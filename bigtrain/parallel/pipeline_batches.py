"""One step's micro-batches as the one batch torch's pipeline schedules split (`PipelineRunner.step` cuts dim 0
into the m micro-batches again).

Micro-batches of padded families may differ in length; they are padded to the longest before they are stacked:
token ids with 0 (a valid id; padded positions are masked), masks with 0 (not a token), labels with -100 (no
target), document ids with one more than the row's last (a document of padding alone). A padded position is a
masked key and an ignored target, so the loss, its gradient and every real position's logits are those of the
unpadded micro-batch (only the order of additions inside attention's reductions may change, by rounding).

Evaluation batches may also differ in rows: a short batch is filled up to the longest with copies of its rows
whose labels are all ignored, and whole batches of ignored rows are added until the schedule's micro-batch count
is met; they add no loss, no target and no sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigtrain.models.loss import IGNORE_INDEX

PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "decoder_attention_mask": 0, "input_ids": 0,
              "decoder_input_ids": 0}


def _pad_to(key: str, t: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - t.shape[1]
    if extra == 0:
        return t
    if key == "document_ids":
        fill = t[:, -1:] + 1
        return torch.cat([t, fill.expand(-1, extra)], dim=1)
    return F.pad(t, (0, extra), value=PAD_VALUES.get(key, 0))


def stack_micro_batches(micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The micro-batches concatenated along dim 0, each key's sequences padded to the longest (module docstring).
    Keys: those of the first micro-batch; every micro-batch holds the same keys and rows."""
    keys = list(micro_batches[0])
    rows = {b["labels"].shape[0] for b in micro_batches}
    if len(rows) != 1:
        raise ValueError(f"pipeline micro-batches must hold equally many rows, got {sorted(rows)}")
    out = {}
    for key in keys:
        parts = [b[key] for b in micro_batches]
        if parts[0].dim() >= 2:
            length = max(t.shape[1] for t in parts)
            parts = [_pad_to(key, t, length) for t in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


def ignored_copy(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """`rows` rows made from `batch`'s rows (cycled), with every label ignored."""
    pick = torch.arange(rows, device=batch["labels"].device) % batch["labels"].shape[0]
    out = {k: v[pick] for k, v in batch.items()}
    out["labels"] = torch.full_like(out["labels"], IGNORE_INDEX)
    return out


def fill_eval_batches(batches: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    """`batches` with every batch filled up to the most rows, then whole ignored batches appended up to `count`
    (module docstring)."""
    rows = max(b["labels"].shape[0] for b in batches)
    full = []
    for b in batches:
        short = rows - b["labels"].shape[0]
        full.append(b if short == 0 else {k: torch.cat([v, ignored_copy(b, short)[k]]) for k, v in b.items()})
    full += [ignored_copy(full[0], rows) for _ in range(count - len(full))]
    return full
