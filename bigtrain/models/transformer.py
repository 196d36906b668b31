"""The three model families, each a plain sequence: embedding -> blocks -> final norm -> output.

The output is [head transform ->] head [-> logit bias] (BERT has the transform and the bias; T5 scales the
last hidden state by d_model^-0.5 before its tied head). With relative positions (T5) each stack has one bias
table whose output every block of the stack adds to its attention scores. That sequence is what pipeline
parallelism cuts into stages and what tensor parallelism rewrites linear by linear; nothing here knows about
either. A `DecodingCache` turns the decoder side into incremental decoding (generation).
"""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.models.blocks import Block
from bigtrain.models.cache import DecodingCache
from bigtrain.models.documents import document_positions
from bigtrain.models.embedding import Embedding
from bigtrain.models.layers import HeadTransform, LogitBias, RelativePositionBias, Rotary, make_norm
from bigtrain.models.moe import is_moe_block


def _final_norm(cfg: ModelConfig) -> nn.Module:
    # Post-norm blocks already end in a norm; pre-norm stacks need one before the head.
    if cfg.norm_position == "pre":
        return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
    return nn.Identity()


def _rotary(cfg: ModelConfig) -> Rotary | None:
    if cfg.positions != "rotary":
        return None
    return Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)


def _position_bias(cfg: ModelConfig, bidirectional: bool) -> RelativePositionBias | None:
    if cfg.positions != "relative":
        return None
    return RelativePositionBias(cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance, bidirectional)


def _moe(cfg: ModelConfig, index: int) -> bool:
    """Whether block `index` of a stack is a mixture-of-experts block (`model.moe`)."""
    return cfg.moe.experts > 0 and is_moe_block(index, cfg.moe.every)


def _positions(cache: DecodingCache | None, position_ids: torch.Tensor | None, length: int,
               device: torch.device) -> torch.Tensor | None:
    """Positions of the new tokens: given, or following the cached ones (None = 0..T-1)."""
    if position_ids is not None or cache is None or cache.length == 0:
        return position_ids
    return torch.arange(cache.length, cache.length + length, device=device)[None, :]


def _bias(table: RelativePositionBias | None, new: int, cache: DecodingCache | None) -> torch.Tensor | None:
    if table is None:
        return None
    return table(new, new + (cache.length if cache is not None else 0))


class TransformerLM(nn.Module):
    """Shared parts of the families: embedding, output head (optionally tied to the embedding)."""

    family: str = ""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = Embedding(cfg, vocab_size)
        self.head_transform = (HeadTransform(cfg.d_model, cfg.activation, cfg.norm, cfg.norm_eps, cfg.bias)
                               if cfg.head_transform else None)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.logit_bias = LogitBias(vocab_size) if cfg.head_bias else None
        self.output_scale = cfg.d_model ** -0.5 if cfg.scale_tied_output else 1.0
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share E between input and output (logits = h Eᵀ); re-run after moving off the meta device."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.tokens.weight

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the final (normed) hidden states."""
        if self.head_transform is not None:
            hidden = self.head_transform(hidden)
        logits = self.head(hidden * self.output_scale if self.output_scale != 1.0 else hidden)
        return logits if self.logit_bias is None else self.logit_bias(logits)

    def stacks(self) -> list[nn.ModuleList]:
        """The block stacks, in the order data flows through them."""
        raise NotImplementedError

    def new_cache(self) -> DecodingCache:
        """An empty cache for incremental decoding (causal and seq2seq families)."""
        raise NotImplementedError(f"the {self.family} family does not generate text")


class _EncoderOrDecoderLM(TransformerLM):
    """One stack of blocks with self-attention only; `causal` decides the mask."""

    causal: bool = True

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__(cfg, vocab_size)
        rotary = _rotary(cfg)
        self.position_bias = _position_bias(cfg, bidirectional=not self.causal)
        self.blocks = nn.ModuleList(Block(cfg, causal=self.causal, cross_attention=False, rotary=rotary,
                                          moe=_moe(cfg, i)) for i in range(cfg.n_layers))
        self.final_norm = _final_norm(cfg)

    def stacks(self) -> list[nn.ModuleList]:
        return [self.blocks]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: DecodingCache | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T]; attention_mask: bool [B, T], True at real tokens (with a cache: [B, cached + T])
        -> logits [B, T, vocab]. position_ids: [B, T] (left-padded rows); cache: incremental decoding.

        document_ids: [B, T] the document of each token of a packed block (`data.document_masking`): attention
        stays inside a document and positions restart at 0 at its first token (`bigtrain.models.documents`),
        so each document's logits are those of the document fed alone."""
        if document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids describe a packed training block; incremental decoding takes none")
            position_ids = document_positions(document_ids) if position_ids is None else position_ids
        position_ids = _positions(cache, position_ids, input_ids.shape[1], input_ids.device)
        x = self.embed(input_ids, position_ids, token_type_ids)
        bias = _bias(self.position_bias, input_ids.shape[1], cache)
        for index, block in enumerate(self.blocks):
            x = block(x, padding_mask=attention_mask, position_bias=bias, position_ids=position_ids,
                      cache=None if cache is None else cache[index], document_ids=document_ids)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.output(self.final_norm(x))


class CausalLM(_EncoderOrDecoderLM):
    """Decoder-only language model (GPT): logits[t] predict token t + 1 from tokens ≤ t."""

    family, causal = "causal", True

    def new_cache(self) -> DecodingCache:
        return DecodingCache(self.blocks)


class MaskedLM(_EncoderOrDecoderLM):
    """Encoder-only masked language model (BERT): bidirectional blocks, logits at every position."""

    family, causal = "masked", False


class Seq2SeqLM(TransformerLM):
    """Encoder-decoder (the original Transformer / T5): the decoder attends causally to itself and fully
    to the encoder output. One embedding serves encoder, decoder and (tied) head."""

    family = "seq2seq"

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__(cfg, vocab_size)
        rotary = _rotary(cfg)
        n_dec = cfg.n_decoder_layers or cfg.n_layers
        self.encoder_position_bias = _position_bias(cfg, bidirectional=True)
        self.encoder_blocks = nn.ModuleList(Block(cfg, causal=False, cross_attention=False, rotary=rotary,
                                                  moe=_moe(cfg, i)) for i in range(cfg.n_layers))
        self.encoder_norm = _final_norm(cfg)
        self.decoder_position_bias = _position_bias(cfg, bidirectional=False)
        self.decoder_blocks = nn.ModuleList(Block(cfg, causal=True, cross_attention=True, rotary=rotary,
                                                  moe=_moe(cfg, i)) for i in range(n_dec))
        self.final_norm = _final_norm(cfg)

    def stacks(self) -> list[nn.ModuleList]:
        return [self.encoder_blocks, self.decoder_blocks]

    def new_cache(self) -> DecodingCache:
        return DecodingCache(self.decoder_blocks, cross_attention=True)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder output [B, S, d]; position_ids [B or 1, S] the positions of the tokens (default 0..S-1:
        a context-parallel rank gives the global positions of its share of the sequence)."""
        x = self.embed(input_ids, position_ids)
        bias = _bias(self.encoder_position_bias, input_ids.shape[1], None)
        for block in self.encoder_blocks:
            x = block(x, padding_mask=attention_mask, position_bias=bias, position_ids=position_ids)
        return self.encoder_norm(x)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None,
               cache: DecodingCache | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the decoder positions given the encoder output `memory`; with a cache, only the new
        decoder tokens are passed (and the cross-attention keys are computed at the first step only).
        position_ids: the decoder tokens' positions (default 0..T-1, or following the cached ones)."""
        position_ids = _positions(cache, position_ids, decoder_input_ids.shape[1], decoder_input_ids.device)
        y = self.embed(decoder_input_ids, position_ids)
        bias = _bias(self.decoder_position_bias, decoder_input_ids.shape[1], cache)
        for index, block in enumerate(self.decoder_blocks):
            y = block(y, padding_mask=decoder_attention_mask, memory=memory, memory_padding_mask=attention_mask,
                      position_bias=bias, position_ids=position_ids,
                      cache=None if cache is None else cache[index])
        if cache is not None:
            cache.length += decoder_input_ids.shape[1]
        return self.output(self.final_norm(y))

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                decoder_position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """position_ids / decoder_position_ids: positions of the encoder / decoder tokens (default 0..T-1)."""
        memory = self.encode(input_ids, attention_mask, position_ids)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask,
                           position_ids=decoder_position_ids)


MODEL_CLASSES: dict[str, type[TransformerLM]] = {
    "causal": CausalLM, "masked": MaskedLM, "seq2seq": Seq2SeqLM,
}
