"""Pipeline parallelism: the model's own layer sequence as a DeepSpeed `PipelineModule`.

The sequence is the one every family already is:

    causal / masked   [position_bias] → embed → blocks → final_norm → [head_transform] → head → [logit_bias]
    seq2seq           [encoder_position_bias] → embed(encoder) → encoder_blocks → encoder_norm →
                      [decoder_position_bias] → embed(decoder) → decoder_blocks → final_norm → ... → head → ...

(bracketed: where the architecture has them). A relative position bias (T5) is computed once per stack by the
layer that holds its table and travels with the hidden states as one more float tensor, so each table lives
on one stage and gets its gradient back through the pipeline like any activation.

Each entry becomes one pipeline layer that wraps the model's own (meta-device) module; a stage materializes
and initializes only the layers it owns (per-parameter generators make that exact). The embedding is a
`TiedLayerSpec` under the key "embed" wherever it is used (the decoder input of seq2seq, and the head when
the model ties them), so DeepSpeed keeps the copies on different stages equal.

What crosses a stage boundary is a tuple of tensors: hidden states (float, they get gradients) and, where
the family needs them, masks, decoder ids and document ids (causal blocks under `data.document_masking`: each
block rebuilds its mask and positions from them) as int64 tensors (DeepSpeed sends gradients for every floating
tensor, and bool tensors only in one special position). Pipeline layers register their module under the
model's attribute path (`blocks.3`, `embed`, `final_norm`, ...), so each layer's state dict uses the
parameter names of the unsplit model: checkpoints consolidate by taking the union of the layer files.

Under context parallelism (causal and masked stacks) hidden states hold this rank's S/C tokens, while document
ids and padding masks travel whole; each embedding and block layer rebuilds the micro-batch's global positions and
every rank's tokens from them (`stage_view`), since a pipeline schedule interleaves micro-batches on a stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bigtrain.compat.deepspeed_import import import_deepspeed
from bigtrain.models import TransformerLM
from bigtrain.models.documents import document_positions
from bigtrain.models.transformer import Seq2SeqLM
from bigtrain.parallel.context.inputs import ContextInputs


def _mask(t: torch.Tensor) -> torch.Tensor:
    return t.bool()


def _drop(out: torch.Tensor, *dropped: torch.Tensor) -> torch.Tensor:
    """`out`, still depending on the tensors a layer does not pass on. DeepSpeed sends a gradient back for
    every floating tensor a stage received (its receive buffer must get one), so a dropped one is kept in the
    graph with weight zero: its gradient is exactly zero, as on one device."""
    for t in dropped:
        if t.is_floating_point() and t.requires_grad:
            out = out + 0.0 * t.sum()
    return out


def stage_view(context: ContextInputs | None, hidden: torch.Tensor, documents: torch.Tensor | None = None,
               padding: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """What a causal or masked stage layer gives the model beside `hidden` [B, T, ...]: position ids, document ids
    and the padding mask. Without context parallelism these are the micro-batch's own (positions within each
    document, or None: 0..T-1). Under context parallelism `hidden` holds this rank's T = S/C tokens while
    `documents` and `padding` travel whole [B, S]: every rank's tokens are set for the attention cores from them
    (`ContextInputs.enter`, at every layer, so that each micro-batch of an interleaved schedule runs with its
    own) and this rank's global positions and shares are returned."""
    if context is None:
        return {"position_ids": None if documents is None else document_positions(documents),
                "document_ids": documents, "attention_mask": padding}
    view = context.enter(hidden.shape[1], documents, padding, hidden.device)
    return {"position_ids": view["position_ids"], "document_ids": view.get("document_ids"),
            "attention_mask": view.get("attention_mask")}


class EmbedPipe(nn.Module):
    """The input embedding (and, when tied, the head that shares its weight)."""

    def __init__(self, model: TransformerLM, materialize: Callable[[nn.Module], None], documents: bool = False,
                 context: ContextInputs | None = None) -> None:
        super().__init__()
        self.seq2seq = isinstance(model, Seq2SeqLM)
        self.with_mask = model.family != "causal"
        self.documents = documents
        self.context = context
        self.embed = model.embed
        materialize(self.embed)
        self.output_scale = model.output_scale
        if model.cfg.tie_embeddings:
            self.head = model.head
            self.head.weight = self.embed.tokens.weight

    def forward(self, inputs):
        """First stage: ids -> hidden states (masks, decoder ids and document ids pass along as int64, a position
        bias as it is); with document ids, positions restart at each document. Under context parallelism the ids
        are this rank's share, the document ids whole, and positions global (`stage_view`)."""
        if isinstance(inputs, torch.Tensor):
            return self.embed(inputs, stage_view(self.context, inputs)["position_ids"])
        docs = inputs[1] if self.documents else None
        return (self.embed(inputs[0], stage_view(self.context, inputs[0], docs)["position_ids"]), *inputs[1:])

    def embed_decoder(self, inputs):
        memory, mask, dec_ids, *rest = inputs
        return (memory, mask, self.embed(dec_ids), *rest)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden * self.output_scale if self.output_scale != 1.0 else hidden)


class PositionBiasPipe(nn.Module):
    """A stack's relative position bias [1, H, T, T], computed from the ids' length and appended to what
    flows (before the embedding of its stack, where the full length is still known)."""

    def __init__(self, name: str, bias: nn.Module, decoder: bool, materialize: Callable[[nn.Module], None],
                 context: ContextInputs | None = None) -> None:
        super().__init__()
        self.name, self.decoder, self.context = name, decoder, context
        materialize(bias)
        setattr(self, name, bias)

    def forward(self, inputs):
        ids = inputs if isinstance(inputs, torch.Tensor) else inputs[2 if self.decoder else 0]
        if self.context is not None:  # `ContextRelativeBias`: the whole sequence's bias over global positions
            self.context.enter(ids.shape[1], device=ids.device)
        bias = getattr(self, self.name)(ids.shape[1], ids.shape[1]).contiguous()  # sent between stages
        return (inputs, bias) if isinstance(inputs, torch.Tensor) else (*inputs, bias)


class BlockPipe(nn.Module):
    """One block of a stack; registered as `<stack>.<index>` so parameter names are the model's."""

    def __init__(self, stack: str, index: int, block: nn.Module, role: str,
                 materialize: Callable[[nn.Module], None], documents: bool = False,
                 context: ContextInputs | None = None) -> None:
        super().__init__()
        self.role = role  # "causal", "masked", "seq2seq-encoder" or "seq2seq-decoder": what flows through
        self.documents = documents  # causal: document ids follow the hidden states
        self.context = context  # causal and masked stacks split over a context group
        self.stack, self.index = stack, str(index)
        materialize(block)
        setattr(self, stack, nn.ModuleDict({self.index: block}))

    @property
    def block(self) -> nn.Module:
        return getattr(self, self.stack)[self.index]

    def forward(self, inputs):
        if self.role == "causal":
            if isinstance(inputs, torch.Tensor):
                return self.block(inputs, position_ids=stage_view(self.context, inputs)["position_ids"])
            if self.documents:
                h, docs, *bias = inputs
                view = stage_view(self.context, h, docs)
                h = self.block(h, position_bias=bias[0] if bias else None, document_ids=view["document_ids"],
                               position_ids=view["position_ids"])
                return (h, docs, *bias)
            h, bias = inputs
            return self.block(h, position_bias=bias, position_ids=stage_view(self.context, h)["position_ids"]), bias
        if self.role == "masked":
            h, mask, *bias = inputs
            view = stage_view(self.context, h, padding=_mask(mask))
            return (self.block(h, padding_mask=view["attention_mask"], position_bias=bias[0] if bias else None,
                               position_ids=view["position_ids"]), mask, *bias)
        if self.role == "seq2seq-encoder":
            h, mask, dec_ids, dec_mask, *bias = inputs
            h = self.block(h, padding_mask=_mask(mask), position_bias=bias[0] if bias else None)
            return (h, mask, dec_ids, dec_mask, *bias)
        memory, mask, y, dec_mask, *bias = inputs
        y = self.block(y, padding_mask=_mask(dec_mask), memory=memory, memory_padding_mask=_mask(mask),
                       position_bias=bias[0] if bias else None)
        return (memory, mask, y, dec_mask, *bias)


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
            memory, mask, dec_ids, dec_mask, *bias = inputs
            return _drop(norm(memory), *bias), mask, dec_ids, dec_mask
        if isinstance(inputs, torch.Tensor):
            return norm(inputs)
        index = 2 if self.family == "seq2seq" else 0
        return _drop(norm(inputs[index]), *(t for i, t in enumerate(inputs) if i != index))


class HeadPipe(nn.Module):
    """An untied output head."""

    def __init__(self, head: nn.Module, output_scale: float, materialize: Callable[[nn.Module], None]) -> None:
        super().__init__()
        materialize(head)
        self.head, self.output_scale = head, output_scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden * self.output_scale if self.output_scale != 1.0 else hidden)


class ModulePipe(nn.Module):
    """A one-tensor module of the output side (`head_transform`, `logit_bias`) under its model name."""

    def __init__(self, name: str, module: nn.Module, materialize: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.name = name
        materialize(module)
        setattr(self, name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


def pipeline_inputs(batch: dict[str, torch.Tensor], family: str, context: ContextInputs | None = None):
    """What the first stage receives for one micro-batch (masks as int64; document ids where the batch has them,
    see `layer_specs`). Under context parallelism (causal and masked) the ids are this rank's share and the
    document ids and padding mask whole (`stage_view`)."""
    ids = batch["input_ids"] if context is None or family == "seq2seq" else context.shard(batch["input_ids"])
    if family == "causal":
        return ids if "document_ids" not in batch else (ids, batch["document_ids"])
    if family == "masked":
        return ids, batch["attention_mask"].long()
    return (batch["input_ids"], batch["attention_mask"].long(), batch["decoder_input_ids"],
            batch["decoder_attention_mask"].long())


def layer_specs(model: TransformerLM, materialize: Callable[[nn.Module], None], documents: bool = False,
                context: ContextInputs | None = None) -> list:
    """The model's layer sequence as DeepSpeed layer specs (nothing is built until a stage builds it).
    Each spec carries `n_params` (counted on the meta model) for partitioning by parameters. `documents`: causal
    batches carry document ids (`data.document_masking`), which flow after the hidden states. `context`: the
    causal or masked stack is split over a context group (hidden states hold this rank's tokens)."""
    import_deepspeed()
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def spec(cls, *args, n_params: int, **kwargs):
        s = cls(*args, **kwargs)
        s.n_params = n_params
        return s

    def embed(**kwargs):
        return spec(TiedLayerSpec, "embed", EmbedPipe, model, materialize, documents, context,
                    n_params=count(model.embed), tied_weight_attr=["embed.tokens.weight"], **kwargs)

    def blocks(stack: str, role: str) -> list:
        return [spec(LayerSpec, BlockPipe, stack, i, b, role, materialize, documents, context, n_params=count(b))
                for i, b in enumerate(getattr(model, stack))]

    def position_bias(name: str, decoder: bool = False) -> list:
        table = getattr(model, name)
        if table is None:
            return []
        return [spec(LayerSpec, PositionBiasPipe, name, table, decoder, materialize, context,
                     n_params=count(table))]

    def output_module(name: str) -> list:
        module = getattr(model, name)
        if module is None:
            return []
        return [spec(LayerSpec, ModulePipe, name, module, materialize, n_params=count(module))]

    family = model.family
    if documents and family != "causal":
        raise ValueError(f"document ids separate the packed blocks of the causal family, not {family}")
    if context is not None and isinstance(model, Seq2SeqLM):
        raise ValueError("context parallelism under DeepSpeed's pipeline splits one stack (causal, masked); "
                         "refused for seq2seq at config load")
    specs: list = []
    if isinstance(model, Seq2SeqLM):
        specs += position_bias("encoder_position_bias")
        specs.append(embed())
        specs += blocks("encoder_blocks", "seq2seq-encoder")
        specs.append(spec(LayerSpec, NormPipe, "encoder_norm", model.encoder_norm, family, materialize,
                          n_params=count(model.encoder_norm)))
        specs += position_bias("decoder_position_bias", decoder=True)
        specs.append(embed(forward_fn=EmbedPipe.embed_decoder))
        specs += blocks("decoder_blocks", "seq2seq-decoder")
    else:
        specs += position_bias("position_bias")
        specs.append(embed())
        specs += blocks("blocks", family)
    specs.append(spec(LayerSpec, NormPipe, "final_norm", model.final_norm, family, materialize,
                      n_params=count(model.final_norm)))
    specs += output_module("head_transform")
    if model.cfg.tie_embeddings:
        specs.append(embed(forward_fn=EmbedPipe.logits))
    else:
        specs.append(spec(LayerSpec, HeadPipe, model.head, model.output_scale, materialize,
                          n_params=count(model.head)))
    specs += output_module("logit_bias")
    return specs
