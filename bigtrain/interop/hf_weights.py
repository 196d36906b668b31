"""Which Hugging Face tensor each bigtrain parameter is, per family (`rules`, which name bigtrain's Q, K, V apart as
`q_proj`, `k_proj`, `v_proj`: the model's one `qkv_proj` is split for `to_hf` and joined by `model.init_from`,
`bigtrain.models.qkv`), and the two directions:
`from_hf(name)` builds one bigtrain tensor from the checkpoint's tensors (read one at a time), `to_hf` writes
the whole transformers state dict.

Layout differences handled here: GPT-2's Conv1D stores weights as [in, out] (transposed from nn.Linear) and
fuses Q, K, V into one `c_attn` [d, 3d]; GPT-NeoX fuses them per head into `query_key_value` [3d, d], whose rows
are (head 0: q, k, v; head 1: q, k, v; ...), and rotates (x_i, x_{i+d/2}) pairs as bigtrain does (rotate_half), so
no row permutation is needed; T5 keeps its relative position bias in the first block of each stack;
BERT's output bias is `cls.predictions.bias`; a BERT without token types or output bias is written with a zero
row / zero bias (the same function). Mixtral's published files keep each expert as three linears (w1 = SwiGLU's
gate, w3 = up, w2 = down), as bigtrain holds them, and its router as `gate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bigtrain.config.schema import ModelConfig
from bigtrain.interop.hf_config import folded_scale
from bigtrain.models.qkv import qkv_layout, split_state


@dataclass(frozen=True)
class Rule:
    """bigtrain tensor `ours` is HF tensor `theirs`: whole, transposed ("T"), the part-th third of a fused
    Conv1D QKV ("qkv"), or the part-th of each of `heads` head's (q, k, v) rows of a fused linear ("heads")."""
    ours: str
    theirs: str
    how: str = ""
    part: int = 0
    heads: int = 0


def _linear(ours: str, theirs: str, bias: bool, how: str = "") -> list[Rule]:
    weight = [Rule(f"{ours}.weight", f"{theirs}.weight", how)]
    return weight + ([Rule(f"{ours}.bias", f"{theirs}.bias")] if bias else [])


def _norm(ours: str, theirs: str, bias: bool) -> list[Rule]:
    return [Rule(f"{ours}.weight", f"{theirs}.weight")] + ([Rule(f"{ours}.bias", f"{theirs}.bias")] if bias else [])


def _gpt2(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("embed.tokens.weight", "transformer.wte.weight"),
             Rule("embed.positions.weight", "transformer.wpe.weight"),
             *_norm("final_norm", "transformer.ln_f", True)]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}", f"transformer.h.{i}"
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rules += [Rule(f"{b}.self_attn.{proj}.weight", f"{h}.attn.c_attn.weight", "qkv", part),
                      Rule(f"{b}.self_attn.{proj}.bias", f"{h}.attn.c_attn.bias", "qkv", part)]
        rules += [*_linear(f"{b}.self_attn.o_proj", f"{h}.attn.c_proj", True, "T"),
                  *_norm(f"{b}.self_attn_norm", f"{h}.ln_1", True), *_norm(f"{b}.ffn_norm", f"{h}.ln_2", True),
                  *_linear(f"{b}.ffn.up", f"{h}.mlp.c_fc", True, "T"),
                  *_linear(f"{b}.ffn.down", f"{h}.mlp.c_proj", True, "T")]
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", "lm_head.weight"))
    return rules


_MIXTRAL_EXPERT = (("gate", "w1"), ("up", "w3"), ("down", "w2"))  # SwiGLU: down(silu(gate x) * up x)


def _llama(cfg: ModelConfig, moe: bool = False) -> list[Rule]:
    """Llama; with `moe`, Mixtral: each block's feed-forward is `block_sparse_moe` with the router `gate` and per
    expert w1 (SwiGLU's gate, silu'd), w3 (up) and w2 (down), as the published checkpoints and transformers'
    save_pretrained store them (transformers fuses them into 3-D tensors on load)."""
    rules = [Rule("embed.tokens.weight", "model.embed_tokens.weight"), Rule("final_norm.weight", "model.norm.weight")]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}", f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules += _linear(f"{b}.self_attn.{proj}", f"{h}.self_attn.{proj}", cfg.bias)
        if moe:
            rules.append(Rule(f"{b}.ffn.router.weight", f"{h}.block_sparse_moe.gate.weight"))
            rules += [Rule(f"{b}.ffn.experts.{e}.{ours}.weight", f"{h}.block_sparse_moe.experts.{e}.{theirs}.weight")
                      for e in range(cfg.moe.experts) for ours, theirs in _MIXTRAL_EXPERT]
        else:
            for ours, theirs in (("up", "up_proj"), ("gate", "gate_proj"), ("down", "down_proj")):
                rules += _linear(f"{b}.ffn.{ours}", f"{h}.mlp.{theirs}", cfg.bias)
        rules += [Rule(f"{b}.self_attn_norm.weight", f"{h}.input_layernorm.weight"),
                  Rule(f"{b}.ffn_norm.weight", f"{h}.post_attention_layernorm.weight")]
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", "lm_head.weight"))
    return rules


def _mixtral(cfg: ModelConfig) -> list[Rule]:
    return _llama(cfg, moe=True)


def _gpt_neox(cfg: ModelConfig) -> list[Rule]:
    m = "gpt_neox"
    rules = [Rule("embed.tokens.weight", f"{m}.embed_in.weight"), *_norm("final_norm", f"{m}.final_layer_norm", True)]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}", f"{m}.layers.{i}"
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rules += [Rule(f"{b}.self_attn.{proj}.{kind}", f"{h}.attention.query_key_value.{kind}", "heads", part,
                           cfg.n_heads) for kind in ("weight", "bias")]
        rules += [*_linear(f"{b}.self_attn.o_proj", f"{h}.attention.dense", True),
                  *_norm(f"{b}.self_attn_norm", f"{h}.input_layernorm", True),
                  *_norm(f"{b}.ffn_norm", f"{h}.post_attention_layernorm", True),
                  *_linear(f"{b}.ffn.up", f"{h}.mlp.dense_h_to_4h", True),
                  *_linear(f"{b}.ffn.down", f"{h}.mlp.dense_4h_to_h", True)]
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", "embed_out.weight"))  # transformers 5 renames it lm_head.weight on load
    return rules


def _bert(cfg: ModelConfig) -> list[Rule]:
    e = "bert.embeddings"
    rules = [Rule("embed.tokens.weight", f"{e}.word_embeddings.weight"),
             Rule("embed.positions.weight", f"{e}.position_embeddings.weight"),
             *_norm("embed.norm", f"{e}.LayerNorm", True),
             *_linear("head_transform.dense", "cls.predictions.transform.dense", True),
             *_norm("head_transform.norm", "cls.predictions.transform.LayerNorm", True)]
    if cfg.type_vocab_size:
        rules.append(Rule("embed.token_types.weight", f"{e}.token_type_embeddings.weight"))
    if cfg.head_bias:
        rules.append(Rule("logit_bias.bias", "cls.predictions.bias"))
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}", f"bert.encoder.layer.{i}"
        for proj, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            rules += _linear(f"{b}.self_attn.{proj}", f"{h}.attention.self.{theirs}", True)
        rules += [*_linear(f"{b}.self_attn.o_proj", f"{h}.attention.output.dense", True),
                  *_norm(f"{b}.self_attn_norm", f"{h}.attention.output.LayerNorm", True),
                  *_linear(f"{b}.ffn.up", f"{h}.intermediate.dense", True),
                  *_linear(f"{b}.ffn.down", f"{h}.output.dense", True),
                  *_norm(f"{b}.ffn_norm", f"{h}.output.LayerNorm", True)]
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", "cls.predictions.decoder.weight"))
    return rules


def _t5(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("embed.tokens.weight", "shared.weight"),
             Rule("encoder_position_bias.table.weight",
                  "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
             Rule("decoder_position_bias.table.weight",
                  "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
             Rule("encoder_norm.weight", "encoder.final_layer_norm.weight"),
             Rule("final_norm.weight", "decoder.final_layer_norm.weight")]
    ffn = ([("gate", "wi_0"), ("up", "wi_1")] if cfg.activation == "swiglu" else [("up", "wi")]) + [("down", "wo")]
    stacks = (("encoder_blocks", "encoder", cfg.n_layers, False),
              ("decoder_blocks", "decoder", cfg.n_decoder_layers or cfg.n_layers, True))
    for ours_stack, theirs_stack, depth, decoder in stacks:
        for i in range(depth):
            b, h = f"{ours_stack}.{i}", f"{theirs_stack}.block.{i}.layer"
            sublayers = [("self_attn", "SelfAttention")] + ([("cross_attn", "EncDecAttention")] if decoder else [])
            for index, (ours, theirs) in enumerate(sublayers):
                for proj in ("q", "k", "v", "o"):
                    rules.append(Rule(f"{b}.{ours}.{proj}_proj.weight", f"{h}.{index}.{theirs}.{proj}.weight"))
                rules.append(Rule(f"{b}.{ours}_norm.weight", f"{h}.{index}.layer_norm.weight"))
            last = len(sublayers)
            rules += [Rule(f"{b}.ffn.{ours}.weight", f"{h}.{last}.DenseReluDense.{theirs}.weight")
                      for ours, theirs in ffn]
            rules.append(Rule(f"{b}.ffn_norm.weight", f"{h}.{last}.layer_norm.weight"))
    return rules


RULES: dict[str, Callable[[ModelConfig], list[Rule]]] = {"gpt2": _gpt2, "llama": _llama, "mixtral": _mixtral,
                                                          "gpt_neox": _gpt_neox, "bert": _bert, "t5": _t5}

# Tensors transformers may also store under another name (tied copies, older layouts).
ALIASES = {"shared.weight": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
           "transformer.wte.weight": ("wte.weight",), "transformer.wpe.weight": ("wpe.weight",),
           "embed_out.weight": ("lm_head.weight",)}


def rules_for(kind: str, cfg: ModelConfig) -> dict[str, Rule]:
    return {rule.ours: rule for rule in RULES[kind](cfg)}


def from_hf(rule: Rule, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The bigtrain tensor of `rule`, from `read(theirs)`."""
    t = read(rule.theirs)
    if rule.how == "T":
        return t.t().contiguous()
    if rule.how == "qkv":
        third = t.shape[-1] // 3
        t = t[..., rule.part * third:(rule.part + 1) * third]
        return t.t().contiguous() if t.dim() == 2 else t.contiguous()
    if rule.how == "heads":  # [3d(, d)] as [heads, 3, head_dim(, d)]: this part of every head
        return t.reshape(rule.heads, 3, -1, *t.shape[1:])[:, rule.part].reshape(-1, *t.shape[1:]).contiguous()
    return t


def to_hf(kind: str, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers state dict of a bigtrain one-device `state` (tied heads stored once, as transformers
    does)."""
    state = split_state(state, *qkv_layout(cfg))  # the rules name Q, K, V apart; the model joins them
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    heads: dict[str, list[torch.Tensor | None]] = {}
    for rule in RULES[kind](cfg):
        t = state[rule.ours].detach().float()
        if rule.how == "T":
            out[rule.theirs] = t.t().contiguous()
        elif rule.how == "qkv":
            parts = fused.setdefault(rule.theirs, [None, None, None])
            parts[rule.part] = t.t() if t.dim() == 2 else t
        elif rule.how == "heads":
            heads.setdefault(rule.theirs, [None, None, None])[rule.part] = t.reshape(rule.heads, -1, *t.shape[1:])
        else:
            out[rule.theirs] = t.contiguous()
    for name, parts in fused.items():
        out[name] = torch.cat(parts, dim=-1).contiguous()  # type: ignore[arg-type]
    for name, parts in heads.items():  # [heads, head_dim(, d)] x 3 -> [heads, 3, head_dim(, d)] -> [3d(, d)]
        stacked = torch.stack(parts, dim=1)  # type: ignore[arg-type]
        out[name] = stacked.reshape(-1, *stacked.shape[3:]).contiguous()
    if kind == "gpt_neox":
        fold_scale(cfg, out)
    if kind == "bert":
        d, vocab = cfg.d_model, state["embed.tokens.weight"].shape[0]
        out.setdefault("bert.embeddings.token_type_embeddings.weight", torch.zeros(1, d))
        out.setdefault("cls.predictions.bias", torch.zeros(vocab))
    return out


def fold_scale(cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    """Fold `model.scale_embeddings` into a GPT-NeoX state dict `out`, in place, as `folded_scale` states:
    E · s into the untied input embedding, or (tied) the attention output and FFN down projections divided by s
    (config.json's layer_norm_eps is eps / d_model then)."""
    how, scale = folded_scale(cfg)
    if how == "embedding":
        out["gpt_neox.embed_in.weight"] = out["gpt_neox.embed_in.weight"] * scale
    elif how == "stream":
        for name in out:
            if ".attention.dense." in name or ".mlp.dense_4h_to_h." in name:
                out[name] = out[name] / scale
