"""`bigtrain export CHECKPOINT --format hf --out DIR`: a folder transformers loads with `from_pretrained`:
config.json, model.safetensors, generation_config.json (the tokenizer's bos, eos and pad ids), and the run's
tokenizer as tokenizer.json + tokenizer_config.json + special_tokens_map.json (`AutoTokenizer.from_pretrained`):
the run's own tokenizer.json (with the special tokens bigtrain added), or for a byte-tokenizer run one built to
encode exactly as bigtrain's byte tokenizer does (`bigtrain.interop.hf_tokenizer`)."""

from __future__ import annotations

import json
from pathlib import Path

from bigtrain.checkpoint.store import writing
from bigtrain.errors import ConfigError
from bigtrain.interop.hf_config import hf_kind, to_hf_config
from bigtrain.interop.hf_tokenizer import write_tokenizer
from bigtrain.interop.hf_weights import to_hf
from bigtrain.io import save_safetensors


def export_hf(path: Path, out: Path, step: int | None = None) -> Path:
    """Write the weights at `path` (anything `bigtrain.checkpoint.weights.load_weights` reads; a run.dir: its
    checkpoint of `step`, default the latest) as a transformers checkpoint in `out`; a model with an option
    transformers lacks is refused naming the option."""
    from bigtrain.checkpoint.weights import load_weights, with_tied
    from bigtrain.config.loader import config_from_dict
    from bigtrain.data import build_tokenizer

    raw, state = load_weights(path, step)
    cfg = config_from_dict(raw)
    try:
        kind = hf_kind(cfg.model)
    except ValueError as exc:
        raise ConfigError(f"Cannot export {path} to Hugging Face: {exc}") from None
    tokenizer = build_tokenizer(cfg.data)
    state = with_tied(state, cfg.model.tie_embeddings)
    vocab_size = state["embed.tokens.weight"].shape[0]
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    config = to_hf_config(cfg.model, vocab_size, ids)
    tensors = to_hf(kind, cfg.model, state)
    generation = {f"{role}_token_id": token_id for role, token_id in ids.items()}
    if kind == "t5":
        generation["decoder_start_token_id"] = ids["bos"]
    out.mkdir(parents=True, exist_ok=True)
    with writing(out / "model.safetensors"):
        save_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt", "source": str(path)})
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer(tokenizer, out, cfg.model.max_seq_len)
    return out
