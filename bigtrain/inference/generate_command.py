"""`bigtrain generate`: continue prompts (causal) or answer sources (seq2seq) with the weights at a path.

The text goes through the run's tokenizer as in training: a causal prompt as it is (an empty one becomes the
end-of-document token, the start of a document), a seq2seq source followed by eos; the decoder starts from bos.
Generation stops at eos or after max_new_tokens; ids beyond the tokenizer's vocabulary are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bigtrain.distributed import detect_env
from bigtrain.errors import GenerationError
from bigtrain.inference.generate import Decoding, generate
from bigtrain.inference.load import load_model, load_tensor_parallel


@dataclass
class Completion:
    """One prompt and what the model generated after it."""

    prompt: str
    text: str  # causal: the prompt followed by the new text; seq2seq: the new text
    new_tokens: int
    stopped_at_eos: bool

    def describe(self, index: int, total: int) -> str:
        end = "stopped at eos" if self.stopped_at_eos else "no eos"
        return f"--- {index + 1}/{total}: {self.prompt!r} ({self.new_tokens} new tokens, {end}) ---\n{self.text}"


def generate_text(path: Path, prompts: list[str], max_new_tokens: int, decoding: Decoding, seed: int = 0,
                  use_cache: bool = True, overrides: list[str] | None = None) -> list[Completion]:
    """Generate from every prompt at once (one batch) with the weights at `path`: on one device, or under a
    launcher with W ranks split W ways by tensor parallelism (every rank returns the same completions)."""
    loaded = load_tensor_parallel(path, overrides) if detect_env().world_size > 1 else load_model(path, overrides)
    tok, family = loaded.tokenizer, loaded.cfg.model.family
    if family not in ("causal", "seq2seq"):
        raise GenerationError(f"{path}: model.family={family} has no generation (a masked LM fills in blanks, it "
                              f"does not continue text); bigtrain generate needs a causal or seq2seq model.")
    encoded = [tok.encode(p) for p in prompts]
    if family == "seq2seq":
        inputs = [[*ids, tok.eos_id] for ids in encoded]
    else:
        inputs = [ids or [tok.eos_id] for ids in encoded]
    new = generate(loaded.model, inputs, max_new_tokens, decoding, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   bos_id=tok.bos_id, seed=seed, use_cache=use_cache and loaded.pad_multiple == 1,
                   vocab_limit=tok.vocab_size, full_logits=loaded.full_logits, pad_multiple=loaded.pad_multiple)
    return [Completion(prompt, tok.decode(ids + tokens) if family == "causal" else tok.decode(tokens),
                       len(tokens), bool(tokens) and tokens[-1] == tok.eos_id)
            for prompt, ids, tokens in zip(prompts, encoded, new, strict=True)]
