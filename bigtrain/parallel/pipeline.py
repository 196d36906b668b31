"""Pipeline parallelism: the model's own layer sequence as a DeepSpeed `PipelineModule`.

The sequence is the one every family already is:

    causal / masked   embed → blocks → final_norm → head
    seq2seq           embed(encoder) → encoder_blocks → encoder_norm → embed(decoder) → decoder_blocks
                      → final_norm → head

Each entry becomes one pipeline layer that wraps the model's own (meta-device) module; a stage materializes
and initializes only the layers it owns (per-parameter generators make that exact). The embedding is a
`TiedLayerSpec` under the key "embed" wherever it is used (the decoder input of seq2seq, and the head when
the model ties them), so DeepSpeed keeps the copies on different stages equal.

What crosses a stage boundary is a tuple of tensors: hidden states (float, they get gradients) and, where
the family needs them, masks and decoder ids as int64 tensors (DeepSpeed sends gradients for every floating
tensor, and bool tensors only in one special position). Pipeline layers register their module under the
model's attribute path (`blocks.3`, `embed`, `final_norm`, ...), so each layer's state dict uses the
parameter names of the unsplit model: checkpoints consolidate by taking the union of the layer files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bigtrain.models import TransformerLM
from bigtrain.models.transformer import Seq2SeqLM


def _mask(t: torch.Tensor) -> torch.Tensor:
    return t.bool()


class EmbedPipe(nn.Module):
    """The input embedding (and, when tied, the head that shares its weight)."""

    def __init__(self, model: TransformerLM, materialize: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.seq2seq = isinstance(model, Seq2SeqLM)
        self.with_mask = model.family != "causal"
        self.embed = model.embed
        materialize(self.embed)
        if model.cfg.tie_embeddings:
            self.head = model.head
            self.head.weight = self.embed.tokens.weight

    def forward(self, inputs):
        """First stage: ids -> hidden states (masks and decoder ids pass along as int64)."""
        if self.seq2seq:
            ids, mask, dec_ids, dec_mask = inputs
            return self.embed(ids), mask, dec_ids, dec_mask
        if self.with_mask:
            ids, mask = inputs
            return self.embed(ids), mask
        return self.embed(inputs)

    def embed_decoder(self, inputs):
        memory, mask, dec_ids, dec_mask = inputs
        return memory, mask, self.embed(dec_ids), dec_mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


class BlockPipe(nn.Module):
    """One block of a stack; registered as `<stack>.<index>` so parameter names are the model's."""

    def __init__(self, stack: str, index: int, block: nn.Module, role: str,
                 materialize: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.role = role  # "causal", "masked", "seq2seq-encoder" or "seq2seq-decoder": what flows through
        self.stack, self.index = stack, str(index)
        materialize(block)
        setattr(self, stack, nn.ModuleDict({self.index: block}))

    @property
    def block(self) -> nn.Module:
        return getattr(self, self.stack)[self.index]

    def forward(self, inputs):
        if self.role == "causal":
            return self.block(inputs)
        if self.role == "masked":
            h, mask = inputs
            return self.block(h, padding_mask=_mask(mask)), mask
        if self.role == "seq2seq-encoder":
            h, mask, dec_ids, dec_mask = inputs
            return self.block(h, padding_mask=_mask(mask)), mask, dec_ids, dec_mask
        memory, mask, y, dec_mask = inputs
        return memory, mask, self.block(y, padding_mask=_mask(dec_mask), memory=memory,
                                        memory_padding_mask=_mask(mask)), dec_mask


class NormPipe(nn.Module):
    """encoder_norm (seq2seq: applied to the memory) or final_norm (drops everything but the hidden states)."""

    def __init__(self, name: str, norm: nn.Module, family: str, materialize: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.name, self.family = name, family
        materialize(norm)
        setattr(self, name, norm)

    def forward(self, inputs):
        norm = getattr(self, self.name)
        if self.name == "encoder_norm":
            memory, mask, dec_ids, dec_mask = inputs
            return norm(memory), mask, dec_ids, dec_mask
        if self.family == "causal":
            return norm(inputs)
        hidden = inputs[2] if self.family == "seq2seq" else inputs[0]
        return norm(hidden)


class HeadPipe(nn.Module):
    """An untied output head."""

    def __init__(self, head: nn.Module, materialize: Callable[[nn.Module], None]) -> None:
        super().__init__()
        materialize(head)
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def pipeline_inputs(batch: dict[str, torch.Tensor], family: str):
    """What the first stage receives for one micro-batch (masks as int64)."""
    if family == "causal":
        return batch["input_ids"]
    if family == "masked":
        return batch["input_ids"], batch["attention_mask"].long()
    return (batch["input_ids"], batch["attention_mask"].long(), batch["decoder_input_ids"],
            batch["decoder_attention_mask"].long())


def layer_specs(model: TransformerLM, materialize: Callable[[nn.Module], None]) -> list:
    """The model's layer sequence as DeepSpeed layer specs (nothing is built until a stage builds it).
    Each spec carries `n_params` (counted on the meta model) for partitioning by parameters."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def spec(cls, *args, n_params: int, **kwargs):
        s = cls(*args, **kwargs)
        s.n_params = n_params
        return s

    def embed(**kwargs):
        return spec(TiedLayerSpec, "embed", EmbedPipe, model, materialize, n_params=count(model.embed),
                    tied_weight_attr=["embed.tokens.weight"], **kwargs)

    def blocks(stack: str, role: str) -> list:
        return [spec(LayerSpec, BlockPipe, stack, i, b, role, materialize, n_params=count(b))
                for i, b in enumerate(getattr(model, stack))]

    family = model.family
    specs: list = [embed()]
    if isinstance(model, Seq2SeqLM):
        specs += blocks("encoder_blocks", "seq2seq-encoder")
        specs.append(spec(LayerSpec, NormPipe, "encoder_norm", model.encoder_norm, family, materialize,
                          n_params=count(model.encoder_norm)))
        specs.append(embed(forward_fn=EmbedPipe.embed_decoder))
        specs += blocks("decoder_blocks", "seq2seq-decoder")
    else:
        specs += blocks("blocks", family)
    specs.append(spec(LayerSpec, NormPipe, "final_norm", model.final_norm, family, materialize,
                      n_params=count(model.final_norm)))
    if model.cfg.tie_embeddings:
        specs.append(embed(forward_fn=EmbedPipe.logits))
    else:
        specs.append(spec(LayerSpec, HeadPipe, model.head, materialize, n_params=count(model.head)))
    return specs
