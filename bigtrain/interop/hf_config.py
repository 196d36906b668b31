"""bigtrain's model section ↔ a Hugging Face `config.json`, for the six families that map one to one:

    GPT-2     causal, learned positions, pre-LN LayerNorm with biases, GELU (exact or tanh) or ReLU
    Llama     causal, rotary, pre-norm RMSNorm, SwiGLU, grouped-query attention (biases optional)
    Mixtral   Llama without biases whose every feed-forward is a mixture of SwiGLU experts (`model.moe`: softmax
              router, top-k renormalized, dropless, no shared experts)
    GPT-NeoX  causal, rotary (all of each head), pre-norm LayerNorm with biases, GELU (exact or tanh) or ReLU,
              sequential residual (use_parallel_residual false); the smoke model's family
    BERT    masked, post-LN, learned positions, embedding LayerNorm, MLM head transform (BertForMaskedLM)
    T5      seq2seq, pre-norm RMSNorm without biases, relative position bias, unscaled attention

`hf_kind` names the family a config maps to, or refuses naming the option without a counterpart;
`to_hf_config` writes config.json; `implied_model` reads one back as bigtrain `model.*` values, which
`model.init_from` compares with the run's own (`mismatches`).
"""

from __future__ import annotations

import math
from typing import Any

from bigtrain.config.schema import ModelConfig
from bigtrain.errors import CheckpointError

KINDS = ("gpt2", "llama", "mixtral", "gpt_neox", "bert", "t5")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM", "bert": "BertForMaskedLM", "t5": "T5ForConditionalGeneration"}
_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "mixtral": "Mixtral", "gpt_neox": "GPT-NeoX", "bert": "BERT",
          "t5": "T5"}

# HF activation names (ACT2FN) for bigtrain's; SwiGLU is Llama's MLP and T5's gated-silu.
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
_ACT_FROM_HF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# What each family fixes (model key -> value); anything else is refused by name.
_FIXED: dict[str, dict[str, Any]] = {
    "gpt2": {"positions": "learned", "norm": "layernorm", "norm_position": "pre", "bias": True,
             "scale_embeddings": False, "embedding_norm": False, "type_vocab_size": 0, "head_transform": False,
             "head_bias": False, "scale_attention": True, "scale_tied_output": False},
    "llama": {"positions": "rotary", "norm": "rmsnorm", "norm_position": "pre", "activation": "swiglu",
              "scale_embeddings": False, "embedding_norm": False, "type_vocab_size": 0, "head_transform": False,
              "head_bias": False, "scale_attention": True, "scale_tied_output": False},
    "mixtral": {"positions": "rotary", "norm": "rmsnorm", "norm_position": "pre", "activation": "swiglu",
                "bias": False, "scale_embeddings": False, "embedding_norm": False, "type_vocab_size": 0,
                "head_transform": False, "head_bias": False, "scale_attention": True, "scale_tied_output": False},
    # scale_embeddings is folded into the weights (`folded_scale`), so it is not fixed here.
    "gpt_neox": {"positions": "rotary", "norm": "layernorm", "norm_position": "pre", "bias": True,
                 "embedding_norm": False, "type_vocab_size": 0, "head_transform": False, "head_bias": False,
                 "scale_attention": True, "scale_tied_output": False},
    "bert": {"positions": "learned", "norm": "layernorm", "norm_position": "post", "bias": True,
             "scale_embeddings": False, "embedding_norm": True, "head_transform": True, "scale_attention": True,
             "scale_tied_output": False},
    "t5": {"positions": "relative", "norm": "rmsnorm", "norm_position": "pre", "bias": False,
           "scale_embeddings": False, "embedding_norm": False, "type_vocab_size": 0, "head_transform": False,
           "head_bias": False, "scale_attention": False, "tie_embeddings": True},
}


def _kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads or cfg.n_heads


def hf_kind(cfg: ModelConfig) -> str:
    """The transformers family this model section maps to; a ValueError naming each option without a
    counterpart otherwise. A causal model with mixture-of-experts blocks maps to Mixtral."""
    if cfg.moe.experts and cfg.family == "causal":
        kind = "mixtral"
    else:
        rotary = "llama" if cfg.norm == "rmsnorm" else "gpt_neox"
        kind = {"masked": "bert", "seq2seq": "t5"}.get(cfg.family) or (rotary if cfg.positions == "rotary" else "gpt2")
    if kind != "mixtral" and cfg.family == "causal" and cfg.positions not in ("learned", "rotary"):
        raise ValueError(f"model.positions={cfg.positions} has no counterpart in transformers' causal models: "
                         f"export maps positions=learned to GPT-2, and positions=rotary to Llama (norm=rmsnorm) or "
                         f"GPT-NeoX (norm=layernorm).")
    problems = [f"model.{key}={getattr(cfg, key)!r} (transformers' {_NAMES[kind]} needs {value!r})"
                for key, value in _FIXED[kind].items() if getattr(cfg, key) != value]
    if kind in ("gpt2", "gpt_neox", "bert") and cfg.activation not in _ACT_TO_HF:
        problems.append(f"model.activation={cfg.activation!r} ({_NAMES[kind]} takes relu, gelu or gelu_tanh)")
    if kind in ("gpt2", "gpt_neox", "bert") and _kv_heads(cfg) != cfg.n_heads:
        problems.append(f"model.n_kv_heads={cfg.n_kv_heads} ({_NAMES[kind]} has no grouped-query attention)")
    if kind == "mixtral":
        problems += _mixtral_problems(cfg)
    elif cfg.moe.experts:
        problems.append(f"model.moe.experts={cfg.moe.experts} (transformers' {_NAMES[kind]} has no "
                        f"mixture-of-experts blocks; they map to Mixtral, a causal model)")
    if problems:
        moe = f" with model.moe.experts={cfg.moe.experts}" if kind == "mixtral" else ""
        raise ValueError(f"This model has no counterpart in transformers ({cfg.family}{moe} maps to {_NAMES[kind]}): "
                         + "; ".join(problems) + ". Train with those values to export to Hugging Face, or export "
                         "with --format safetensors (bigtrain's own).")
    return kind


def _mixtral_problems(cfg: ModelConfig) -> list[str]:
    """The `model.moe` values transformers' Mixtral lacks: every block is an MoE block, routing is dropless, no
    shared experts."""
    moe, problems = cfg.moe, []
    if moe.every != 1:
        problems.append(f"model.moe.every={moe.every} (Mixtral has mixture-of-experts blocks in every layer: 1)")
    if moe.shared_experts:
        problems.append(f"model.moe.shared_experts={moe.shared_experts} (Mixtral has no shared experts: 0)")
    if moe.capacity_factor > 0:
        problems.append(f"model.moe.capacity_factor={moe.capacity_factor} (Mixtral's routing is dropless: 0)")
    return problems


def folded_scale(cfg: ModelConfig) -> tuple[str, float]:
    """How a GPT-NeoX export (of a `cfg` that `hf_kind` maps to gpt_neox) carries `model.scale_embeddings`
    (x_0 = s · E[ids], s = sqrt(d_model)), which transformers' GPT-NeoX lacks, with the same logits; ("", 1.0)
    when there is nothing to fold.

    ("embedding", s), untied head: the input embedding is written as s · E (the head keeps its own matrix); the
    same products bigtrain computes, E[ids] · s.
    ("stream", s), tied head (the smoke model): E must stay the head's matrix unscaled, so the whole residual
    stream is carried divided by s instead: r' = r / s starts at E[ids]; each block adds sublayer(LN(s r')) / s,
    so the attention output and FFN down projections (weights and biases) are divided by s; and every LayerNorm
    sees s r', where LN_eps(s r') = LN_{eps / s²}(r') exactly ((s r' - s m) / sqrt(s² v + eps)), so
    layer_norm_eps becomes eps / d_model. The final LayerNorm's output, hence the logits, is unchanged.
    """
    if not cfg.scale_embeddings:
        return "", 1.0
    return ("embedding" if not cfg.tie_embeddings else "stream"), math.sqrt(cfg.d_model)


def to_hf_config(cfg: ModelConfig, vocab_size: int, ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json for `cfg` (which `hf_kind` accepts) with `vocab_size` rows and the tokenizer's special ids
    (`bos`, `eos`, `pad`)."""
    kind = hf_kind(cfg)
    d, heads = cfg.d_model, cfg.n_heads
    common = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": vocab_size,
              "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"), "pad_token_id": ids.get("pad"),
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32"}
    if kind == "gpt2":
        return {**common, "n_embd": d, "n_layer": cfg.n_layers, "n_head": heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "activation_function": _ACT_TO_HF[cfg.activation],
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": _attention_dropout(cfg), "scale_attn_weights": True}
    if kind == "llama":
        return {**common, "hidden_size": d, "num_hidden_layers": cfg.n_layers, "num_attention_heads": heads,
                "num_key_value_heads": _kv_heads(cfg), "head_dim": d // heads, "intermediate_size": cfg.d_ff,
                "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
                "rope_theta": cfg.rope_theta, "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
                "attention_dropout": _attention_dropout(cfg)}
    if kind == "mixtral":
        return {**common, "hidden_size": d, "num_hidden_layers": cfg.n_layers, "num_attention_heads": heads,
                "num_key_value_heads": _kv_heads(cfg), "head_dim": d // heads,
                "intermediate_size": cfg.moe.d_ff or cfg.d_ff, "hidden_act": "silu",
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
                "rope_theta": cfg.rope_theta, "sliding_window": None, "attention_dropout": _attention_dropout(cfg),
                "num_local_experts": cfg.moe.experts, "num_experts_per_tok": cfg.moe.top_k,
                "router_aux_loss_coef": cfg.moe.aux_loss_coef, "router_jitter_noise": 0.0,
                "output_router_logits": False}
    if kind == "gpt_neox":
        how, scale = folded_scale(cfg)
        eps = cfg.norm_eps / scale**2 if how == "stream" else cfg.norm_eps
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}
        return {**common, "hidden_size": d, "num_hidden_layers": cfg.n_layers, "num_attention_heads": heads,
                "intermediate_size": cfg.d_ff, "hidden_act": _ACT_TO_HF[cfg.activation],
                "max_position_embeddings": cfg.max_seq_len, "layer_norm_eps": eps, "use_parallel_residual": False,
                "rope_parameters": rope, "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_theta,  # (older names)
                "attention_bias": True, "hidden_dropout": cfg.dropout, "attention_dropout": _attention_dropout(cfg)}
    if kind == "bert":
        return {**common, "hidden_size": d, "num_hidden_layers": cfg.n_layers, "num_attention_heads": heads,
                "intermediate_size": cfg.d_ff, "hidden_act": _ACT_TO_HF[cfg.activation],
                "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": max(cfg.type_vocab_size, 1),
                "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
                "attention_probs_dropout_prob": _attention_dropout(cfg)}
    ff = "gated-silu" if cfg.activation == "swiglu" else _ACT_TO_HF[cfg.activation]
    # transformers' T5 always ties lm_head to the shared embedding and reads tie_word_embeddings as "rescale
    # the decoder output by d_model^-0.5" (T5 v1.0: true, v1.1: false).
    return {**common, "tie_word_embeddings": cfg.scale_tied_output, "is_encoder_decoder": True,
            "d_model": d, "d_kv": d // heads, "d_ff": cfg.d_ff, "num_layers": cfg.n_layers,
            "num_decoder_layers": cfg.n_decoder_layers or cfg.n_layers, "num_heads": heads,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance, "layer_norm_epsilon": cfg.norm_eps,
            "feed_forward_proj": ff, "dropout_rate": cfg.dropout, "decoder_start_token_id": ids.get("bos")}


def _attention_dropout(cfg: ModelConfig) -> float:
    return cfg.dropout if cfg.attention_dropout is None else cfg.attention_dropout


def _get(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def implied_model(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The bigtrain `model.*` values of a transformers config.json (`where` names it in errors; `moe.x` is
    `model.moe.x`); `vocab_size` is the embedding's row count. Every family but Mixtral has dense blocks."""
    return {"moe.experts": 0, **_implied_family(hf, where)}


def _implied_family(hf: dict[str, Any], where: str) -> dict[str, Any]:
    kind = hf.get("model_type")
    if kind not in KINDS:
        raise CheckpointError(f"{where} is a transformers '{kind}' model; model.init_from reads {', '.join(KINDS)} "
                              f"checkpoints.")
    fixed = dict(_FIXED[kind])
    if kind == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or \
                hf.get("scale_attn_weights") is False or hf.get("add_cross_attention"):
            raise CheckpointError(f"{where}: GPT-2 options scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, "
                                  f"scale_attn_weights=false and add_cross_attention have no bigtrain counterpart.")
        act = _activation(hf.get("activation_function", "gelu_new"), where)
        d = hf.get("n_embd", 768)
        return {**fixed, "family": "causal", "vocab_size": hf["vocab_size"], "d_model": d,
                "n_layers": hf.get("n_layer", 12), "n_heads": hf.get("n_head", 12), "n_kv_heads": hf.get("n_head", 12),
                "d_ff": hf.get("n_inner") or 4 * d, "max_seq_len": hf.get("n_positions", 1024), "activation": act,
                "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "tie_embeddings": hf.get("tie_word_embeddings", True)}
    if kind in ("llama", "mixtral"):
        return {**fixed, **_implied_llama(hf, where, kind)}
    if kind == "gpt_neox":
        return {**fixed, **_implied_neox(hf, where)}
    if kind == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute" or hf.get("is_decoder"):
            raise CheckpointError(f"{where}: position_embedding_type={hf.get('position_embedding_type')!r} / "
                                  f"is_decoder have no bigtrain counterpart (absolute positions, encoder only).")
        d = hf["hidden_size"]
        return {**fixed, "family": "masked", "vocab_size": hf["vocab_size"], "d_model": d,
                "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
                "n_kv_heads": hf["num_attention_heads"], "d_ff": hf["intermediate_size"],
                "max_seq_len": hf.get("max_position_embeddings", 512), "type_vocab_size": hf.get("type_vocab_size", 2),
                "activation": _activation(hf.get("hidden_act", "gelu"), where), "head_bias": True,
                "norm_eps": hf.get("layer_norm_eps", 1e-12), "tie_embeddings": hf.get("tie_word_embeddings", True)}
    d, heads = hf["d_model"], hf["num_heads"]
    if hf.get("d_kv", d // heads) * heads != d:
        raise CheckpointError(f"{where}: d_kv * num_heads = {hf.get('d_kv')} * {heads} differs from d_model={d}; "
                              f"bigtrain's attention is d_model wide.")
    ff = hf.get("feed_forward_proj", "relu")
    act = "swiglu" if ff == "gated-silu" else None if ff.startswith("gated") else _activation(ff, where)
    if act is None:
        raise CheckpointError(f"{where}: feed_forward_proj={ff!r} has no bigtrain counterpart (relu, gelu, "
                              f"gelu_new or gated-silu = model.activation=swiglu).")
    return {**fixed, "family": "seq2seq", "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_layers"],
            "n_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"], "n_heads": heads,
            "n_kv_heads": heads, "d_ff": hf["d_ff"], "activation": act,
            "relative_buckets": hf.get("relative_attention_num_buckets", 32),
            "relative_max_distance": hf.get("relative_attention_max_distance", 128),
            "norm_eps": hf.get("layer_norm_epsilon", 1e-6),
            # as transformers reads it: tie_word_embeddings false in config.json = no output rescale
            "scale_tied_output": hf.get("tie_word_embeddings", True) is not False}


def _implied_llama(hf: dict[str, Any], where: str, kind: str) -> dict[str, Any]:
    """A Llama or Mixtral config.json as bigtrain values; scaled rotary, a head size other than d_model / n_heads,
    an activation other than SiLU gating and (Mixtral) sliding-window attention are refused. Defaults are
    transformers' own (Mixtral: rms_norm_eps 1e-5, rope_theta 1e6, 8 experts, top-2)."""
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{where}: rope_type={rope.get('rope_type', rope.get('type'))!r} (scaled rotary "
                              f"embeddings) has no bigtrain counterpart; bigtrain's rotary is rope_type default.")
    if _get(hf, "head_dim", default=d // heads) != d // heads:
        raise CheckpointError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size / "
                              f"num_attention_heads = {d // heads}; bigtrain's heads are d_model / n_heads wide.")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise CheckpointError(f"{where}: hidden_act={hf.get('hidden_act')!r}, attention_bias="
                              f"{hf.get('attention_bias')}, mlp_bias={hf.get('mlp_bias')}: bigtrain's {_NAMES[kind]} "
                              f"has SiLU gating and one model.bias for attention and MLP.")
    mixtral = kind == "mixtral"
    if mixtral and hf.get("sliding_window") is not None:
        raise CheckpointError(f"{where}: sliding_window={hf['sliding_window']} (attention to the last tokens only) "
                              f"has no bigtrain counterpart; bigtrain's causal attention sees the whole context "
                              f"(sliding_window null).")
    theta = float(_get(rope, "rope_theta", default=_get(hf, "rope_theta", default=1e6 if mixtral else 10000.0)))
    out = {"family": "causal", "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"],
           "n_heads": heads, "n_kv_heads": _get(hf, "num_key_value_heads", default=8 if mixtral else heads),
           "norm_eps": hf.get("rms_norm_eps", 1e-5 if mixtral else 1e-6), "rope_theta": theta,
           "tie_embeddings": hf.get("tie_word_embeddings", False)}
    if not mixtral:
        return {**out, "d_ff": hf["intermediate_size"], "bias": bool(hf.get("attention_bias", False))}
    # Every block is an MoE block without shared experts; capacity_factor and the loss weights are training
    # choices of the run (a capacity limit drops assignments: the run says so, transformers' Mixtral does not).
    return {**out, "moe.experts": hf.get("num_local_experts", 8), "moe.top_k": hf.get("num_experts_per_tok", 2),
            "moe.d_ff": hf.get("intermediate_size", 14336), "moe.every": 1, "moe.shared_experts": 0}


def _implied_neox(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """A GPT-NeoX config.json as bigtrain values; parallel residuals and partial or scaled rotary are refused.
    Defaults are transformers' own (rotary_pct 0.25, parallel residual, untied head, biases)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    pct = float(_get(rope, "partial_rotary_factor", default=_get(hf, "rotary_pct", default=0.25)))
    problems = []
    if hf.get("use_parallel_residual", True):
        problems.append("use_parallel_residual=true (x + attn(LN1(x)) + mlp(LN2(x)); bigtrain's blocks are "
                        "sequential: set it false only for a model trained that way)")
    if pct != 1.0:
        problems.append(f"partial_rotary_factor / rotary_pct={pct} (bigtrain rotates all of each head: 1.0)")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope_type={rope.get('rope_type', rope.get('type'))!r} (bigtrain's rotary is default)")
    if hf.get("attention_bias", True) is False:
        problems.append("attention_bias=false (bigtrain's model.bias=true has attention biases too)")
    if problems:
        raise CheckpointError(f"{where}: GPT-NeoX options without a bigtrain counterpart: " + "; ".join(problems)
                              + ".")
    d, heads = hf.get("hidden_size", 6144), hf.get("num_attention_heads", 64)
    theta = _get(rope, "rope_theta", default=_get(hf, "rotary_emb_base", "rope_theta", default=10000.0))
    return {"family": "causal", "vocab_size": hf["vocab_size"], "d_model": d,
            "n_layers": hf.get("num_hidden_layers", 44), "n_heads": heads, "n_kv_heads": heads,
            "d_ff": hf.get("intermediate_size", 4 * d), "activation": _activation(hf.get("hidden_act", "gelu"), where),
            "norm_eps": hf.get("layer_norm_eps", 1e-5), "rope_theta": float(theta), "scale_embeddings": False,
            "tie_embeddings": hf.get("tie_word_embeddings", False)}


def _activation(name: str, where: str) -> str:
    if name not in _ACT_FROM_HF:
        raise CheckpointError(f"{where}: activation {name!r} has no bigtrain counterpart (relu, gelu, gelu_new).")
    return _ACT_FROM_HF[name]


def _effective(cfg: ModelConfig, key: str, vocab_size: int) -> Any:
    if key == "moe.d_ff":
        return cfg.moe.d_ff or cfg.d_ff
    if key.startswith("moe."):
        return getattr(cfg.moe, key.removeprefix("moe."))
    if key == "vocab_size":
        return vocab_size
    if key == "n_kv_heads":
        return _kv_heads(cfg)
    if key == "n_decoder_layers":
        return cfg.n_decoder_layers or cfg.n_layers
    return getattr(cfg, key)


def mismatches(cfg: ModelConfig, implied: dict[str, Any], vocab_size: int) -> list[tuple[str, Any, Any]]:
    """(key, this run's value, the checkpoint's) for every `model.*` value that differs. Floats compare to 1e-9
    relative (norm epsilons, rotary base)."""
    out = []
    for key, theirs in implied.items():
        ours = _effective(cfg, key, vocab_size)
        same = (abs(ours - theirs) <= 1e-9 * max(abs(ours), abs(theirs))) if isinstance(theirs, float) and \
            isinstance(ours, int | float) and not isinstance(ours, bool) else ours == theirs
        if not same:
            out.append((key, ours, theirs))
    return out
