"""What the planner needs to know of a model, read once from the model built on the meta device (no memory):
its pipeline layers in order with their parameter counts, which of those parameters a tensor-parallel split
cuts, and the sizes that activations and FLOPs depend on.

The layer sequence is the pipeline engine's (`bigtrain.parallel.pipeline.layer_specs`): [position bias],
embedding, blocks, [encoder norm, decoder embedding, decoder blocks], final norm, [head transform], head (the
tied embedding again when tied), [logit bias]. A tied embedding is held by the first and the last stage.

Mixture-of-experts blocks (`model.moe`, E routed experts of width f_e, top_k = K, S shared experts): a block's
`routed` parameters are its E routed experts (what expert parallelism divides by EP; `routed_split` of them a
tensor split cuts), and `inactive` = routed · (E − K) / E the matmul parameters a token does not visit. So

    total parameters    N_total  = Σ params                     (what memory holds, EP = 1)
    active per token    N_active = N_total − Σ inactive         (dense + shared + K/E of the routed experts)

and FLOPs count N_active (`bigtrain.planning.flops.matmul_parameters`, the same subtraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from torch import nn

from bigtrain.config import Config
from bigtrain.config.model_checks import tensor_split_problems
from bigtrain.data.tokenizer import ByteTokenizer
from bigtrain.errors import ConfigError
from bigtrain.models import TransformerLM, build_model, count_parameters
from bigtrain.models.build import resolve_vocab_size
from bigtrain.models.moe import moe_layers
from bigtrain.models.transformer import Seq2SeqLM
from bigtrain.parallel.tensor import apply_tensor_parallel
from bigtrain.parallel.tensor_layers import TensorParallel
from bigtrain.planning.flops import training_flops


@dataclass(frozen=True)
class PipelineLayer:
    kind: str  # embed, block, cross_block (a decoder block with cross-attention), norm, head, other
    params: int  # all parameters of the layer
    split: int  # of which a tensor-parallel split cuts (each rank holds split / T)
    matmul: int  # parameters that take part in matrix multiplies (FLOPs)
    tied: bool = False  # the shared embedding (DeepSpeed's tied layer): a stage holds one copy however often
    index: int = 0  # a block's place in its stack (activation checkpointing of every n-th block counts it)
    routed: int = 0  # of `params`, the routed experts of an MoE block (each rank of an expert group holds 1/EP)
    routed_split: int = 0  # of `routed`, what a tensor-parallel split cuts
    inactive: int = 0  # of `matmul`, the routed experts a token does not visit: routed · (E − K) / E

    @property
    def active(self) -> int:
        """Matmul parameters one token passes through (FLOPs): all but the routed experts it skips."""
        return self.matmul - self.inactive


@dataclass(frozen=True)
class ModelShape:
    family: str
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int
    seq_len: int
    n_blocks: int
    n_params: int  # unique parameters (a tied embedding once)
    matmul_params: int  # PaLM's N: without the input tables, the output head counted once; active only (MoE)
    layers: tuple[PipelineLayer, ...]
    norm: str
    activation: str
    dropout: float
    attention_dropout: float
    tensor_sizes: tuple[int, ...]  # tensor-parallel sizes the model splits over (up to 64)
    experts: int = 0  # routed experts E per MoE block (0: dense model)
    top_k: int = 0  # experts K a token visits
    expert_d_ff: int = 0  # hidden width f_e of each expert (routed and shared)
    shared_experts: int = 0  # always-on experts S per MoE block
    capacity_factor: float = 0.0  # 0: dropless
    moe_blocks: int = 0

    @property
    def active_params(self) -> int:
        """Parameters one token uses: N_total − Σ inactive (module docstring); N_total for a dense model."""
        return self.n_params - sum(x.inactive for x in self.layers)

    @property
    def routed_params(self) -> int:
        """The routed experts' parameters of every MoE block."""
        return sum(x.routed for x in self.layers)

    @cached_property
    def kinds(self) -> tuple[str, ...]:
        return tuple(layer.kind for layer in self.layers)

    def flops_per_token(self) -> float:
        """Model FLOPs of training per token (PaLM appendix B): 6·N + 12·L·d_model·seq_len, N the active matmul
        parameters."""
        return training_flops(self.matmul_params, self.n_blocks, self.d_model, self.seq_len)


def vocabulary(cfg: Config) -> int:
    """model.vocab_size, or the tokenizer's size rounded up to model.vocab_multiple."""
    tokenizer = cfg.data.tokenizer
    if cfg.model.vocab_size is not None or tokenizer == "byte":
        return resolve_vocab_size(cfg.model, ByteTokenizer.vocab_size)
    if not Path(tokenizer).is_file():
        raise ConfigError(f"model.vocab_size is null and data.tokenizer={tokenizer!r} is not a file, so the "
                          f"vocabulary size is unknown. Set model.vocab_size=N (e.g. 50304 for GPT-2's tokenizer).")
    from bigtrain.data.tokenizer import build_tokenizer

    return resolve_vocab_size(cfg.model, build_tokenizer(cfg.data).vocab_size)


def _layers(model: TransformerLM) -> list[tuple[str, list[tuple[str, int, bool]], int, int, int]]:
    """(kind, [(parameter name, numel, routed expert?)], matmul parameters, index in its stack, inactive matmul
    parameters) of each pipeline layer of the unsplit model."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    routed = {id(p) for moe in moe_layers(model) for p in moe.experts.parameters()}

    def layer(kind: str, module: nn.Module | None, matmul: bool, index: int = 0) -> list:
        if module is None:
            return []
        params = list(module.parameters())
        dense = sum(p.numel() for p in params if p.ndim >= 2) if matmul else 0
        inactive = sum(sum(p.numel() for p in moe.experts.parameters()) * (len(moe.experts) - moe.top_k)
                       // len(moe.experts) for moe in moe_layers(module))  # as flops.matmul_parameters
        return [(kind, [(names[id(p)], p.numel(), id(p) in routed) for p in params], dense, index, inactive)]

    def embed() -> list[PipelineLayer]:
        return layer("embed", model.embed, matmul=False)

    def blocks(stack: str, kind: str) -> list[PipelineLayer]:
        return [x for i, b in enumerate(getattr(model, stack)) for x in layer(kind, b, matmul=True, index=i)]

    out: list = []
    if isinstance(model, Seq2SeqLM):
        out += layer("other", model.encoder_position_bias, False) + embed() + blocks("encoder_blocks", "block")
        out += layer("norm", model.encoder_norm, False) + layer("other", model.decoder_position_bias, False)
        out += embed() + blocks("decoder_blocks", "cross_block")
    else:
        out += layer("other", model.position_bias, False) + embed() + blocks("blocks", "block")
    out += layer("norm", model.final_norm, False) + layer("other", model.head_transform, True)
    if model.cfg.tie_embeddings:  # the embedding layer again (DeepSpeed's tied layer on the last stage)
        first = next(x for x in out if x[0] == "embed")
        out.append(("head", first[1], model.head.weight.numel(), 0, 0))
    else:
        out += layer("head", model.head, matmul=True)
    out += layer("other", model.logit_bias, False)
    return out


def model_shape(cfg: Config) -> ModelShape:
    m = cfg.model
    vocab = vocabulary(cfg)
    model = build_model(m, vocab, "meta")
    sizes = tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if not tensor_split_problems(m, vocab, t))
    pieces = _layers(model)
    tables = [model.embed.tokens.weight, getattr(model.embed.positions, "weight", None)]
    matmul = count_parameters(model) - sum(t.numel() for t in tables if t is not None)
    matmul += model.head.weight.numel() * m.tie_embeddings
    n_params, n_blocks = count_parameters(model), sum(len(s) for s in model.stacks())
    split_names = set()
    if len(sizes) > 1:  # which parameters a split cuts (the same for every size); rewrites this meta model
        split_names = set(apply_tensor_parallel(model, TensorParallel(group=None, rank=0, size=sizes[1])))
    tied = {"embed"} | ({"head"} if m.tie_embeddings else set())
    layers = [PipelineLayer(kind, sum(n for _, n, _ in params), sum(n for name, n, _ in params if name in split_names),
                            dense, tied=kind in tied, index=index, routed=sum(n for _, n, r in params if r),
                            routed_split=sum(n for name, n, r in params if r and name in split_names),
                            inactive=inactive)
              for kind, params, dense, index, inactive in pieces]
    attention_dropout = m.dropout if m.attention_dropout is None else m.attention_dropout
    moe = m.moe
    return ModelShape(
        family=m.family, d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads or m.n_heads,
        d_ff=m.d_ff, vocab=vocab, seq_len=cfg.data.seq_len, n_blocks=n_blocks,
        n_params=n_params, matmul_params=matmul - sum(x.inactive for x in layers), layers=tuple(layers),
        norm=m.norm, activation=m.activation, dropout=m.dropout, attention_dropout=attention_dropout,
        tensor_sizes=sizes, experts=moe.experts, top_k=moe.top_k if moe.experts else 0,
        expert_d_ff=(moe.d_ff or m.d_ff) if moe.experts else 0, shared_experts=moe.shared_experts if moe.experts
        else 0, capacity_factor=moe.capacity_factor if moe.experts else 0.0,
        moe_blocks=sum(x.routed > 0 for x in layers))
