"""Text generation from a causal or seq2seq model: greedy, sampling or beam search, batched, with a KV cache.

    greedy    x_{t+1} = argmax_v logits_t
    sample    x_{t+1} ~ softmax(top_p(top_k(logits_t / temperature))), drawn with a generator seeded by `seed`
    beam      transformers' beam search (`beam.py`): B beams per prompt, hypotheses scored Σ log p / length^α

Each row stops at `eos_id` (the EOS is kept; finished rows leave the batch) or after max_new_tokens. Ids at or
above `vocab_limit` (padding rows of the embedding) are never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bigtrain.errors import GenerationError
from bigtrain.inference.beam import beam_search
from bigtrain.inference.decoder_rows import CausalRows, FullLogits, Rows, Seq2SeqRows
from bigtrain.inference.sampling import limit_vocab, sample_tokens
from bigtrain.models import TransformerLM

Spell = Callable[[str, object], str]
OnToken = Callable[[int, int], None]  # (prompt index, token): each new token as it is chosen


def _as_argument(name: str, value: object) -> str:
    return f"{name}={value}"


def decoding_problems(greedy: bool = False, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, beams: int = 1, length_penalty: float | None = None,
                      spell: Spell = _as_argument) -> list[str]:
    """What is wrong with these decoding options, each named by `spell(name, value)` (the command line spells
    them as flags)."""
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    sampling = [spell(name, value) for name, value in given.items() if value is not None]
    problems = []
    if beams < 1:
        problems.append(f"{spell('beams', beams)}: the number of beams must be >= 1.")
    if beams > 1 and (sampling or greedy):
        what = spell("greedy", True) if greedy else " / ".join(sampling)
        problems.append(f"{spell('beams', beams)} cannot be combined with {what}: beam search chooses tokens "
                        f"deterministically. Use beam search alone, or drop the beams for greedy / sampling.")
    if greedy and sampling:
        problems.append(f"{spell('greedy', True)} cannot be combined with {' / '.join(sampling)}: drop "
                        f"{spell('greedy', True)} to sample, or drop {' / '.join(sampling)} for greedy decoding.")
    if length_penalty is not None and beams == 1:
        problems.append(f"{spell('length_penalty', length_penalty)} applies to beam search only: add "
                        f"{spell('beams', 4)} (or more than 1 beam), or drop it.")
    if temperature is not None and not temperature > 0:
        problems.append(f"{spell('temperature', temperature)} must be > 0 (for the argmax use greedy decoding).")
    elif temperature is not None and not math.isfinite(temperature):
        problems.append(f"{spell('temperature', temperature)} must be a finite number (1.0 samples the model's own "
                        f"distribution).")
    if length_penalty is not None and not math.isfinite(length_penalty):
        problems.append(f"{spell('length_penalty', length_penalty)} must be a finite number: hypotheses are ranked "
                        f"by sum(log p) / length^A, which {length_penalty} leaves undefined (1.0 is the default).")
    if top_k is not None and top_k < 1:
        problems.append(f"{spell('top_k', top_k)} must be >= 1.")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"{spell('top_p', top_p)} must be in (0, 1].")
    return problems


@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen: beam search when beams > 1, sampling when any of temperature / top_k / top_p is
    set, else greedy. Contradictory or out-of-range options raise GenerationError."""

    greedy: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    beams: int = 1
    length_penalty: float | None = None  # None: 1.0, transformers' default

    def __post_init__(self) -> None:
        problems = decoding_problems(self.greedy, self.temperature, self.top_k, self.top_p, self.beams,
                                     self.length_penalty)
        if problems:
            raise GenerationError(problems[0])

    @property
    def mode(self) -> str:
        if self.beams > 1:
            return "beam"
        if any(v is not None for v in (self.temperature, self.top_k, self.top_p)):
            return "sample"
        return "greedy"

    def describe(self) -> str:
        if self.mode == "beam":
            return f"beam search, {self.beams} beams, length penalty {self.length_penalty or 1.0}"
        if self.mode == "greedy":
            return "greedy"
        parts = [f"{k} {v}" for k, v in (("temperature", self.temperature), ("top-k", self.top_k),
                                         ("top-p", self.top_p)) if v is not None]
        return "sampling, " + ", ".join(parts)


def _check(model: TransformerLM, prompts: list[list[int]], max_new_tokens: int, bos_id: int | None) -> None:
    if model.family not in ("causal", "seq2seq"):  # by family: a wrapper that runs the model (FSDP) forwards it
        raise GenerationError(f"model.family={model.family} has no generation (a masked LM fills in blanks, it "
                              f"does not continue text); use a causal or seq2seq model.")
    if not prompts:
        raise GenerationError("no prompts given: pass at least one.")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 0.")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise GenerationError(f"prompt {empty[0]} is empty: a prompt needs at least one token (a causal model "
                              f"starts a document from the end-of-document token).")
    if model.family == "seq2seq":
        limit = model.cfg.max_seq_len
        if bos_id is None:
            raise GenerationError("seq2seq generation starts the decoder from bos: pass bos_id.")
        longest = max(len(p) for p in prompts)
        if longest > limit:
            raise GenerationError(f"a source of {longest} tokens exceeds model.max_seq_len={limit}; shorten it.")
        if max_new_tokens > limit:
            raise GenerationError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens} decoder positions but "
                                  f"model.max_seq_len={limit}; lower max_new_tokens to {limit}.")


@torch.no_grad()
def generate(model: TransformerLM, prompts: list[list[int]], max_new_tokens: int,
             decoding: Decoding | None = None, *, eos_id: int | None = None, pad_id: int = 0,
             bos_id: int | None = None, seed: int = 0, use_cache: bool = True, vocab_limit: int | None = None,
             full_logits: FullLogits | None = None, pad_multiple: int = 1,
             on_token: OnToken | None = None) -> list[list[int]]:
    """The new tokens of each prompt (a causal model's context, or a seq2seq model's source as the encoder
    reads it), all prompts in one batch.

    use_cache: keep keys and values between steps (off under sequence parallelism, pad_multiple > 1);
    full_logits: turns the model's logits into logits over the whole vocabulary (tensor parallelism gathers
    its vocabulary shards); pad_id fills padding; bos_id starts a seq2seq decoder; on_token: called with each
    token greedy decoding or sampling chooses, as it is chosen (beam search knows its tokens only at the end)."""
    decoding = decoding or Decoding()
    _check(model, prompts, max_new_tokens, bos_id)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        repeat = decoding.beams
        rows_prompts = [p for p in prompts for _ in range(repeat)]
        rows: Rows
        if model.family == "seq2seq":
            assert bos_id is not None
            rows = Seq2SeqRows(model, rows_prompts, pad_id, bos_id, use_cache, pad_multiple, full_logits)
        else:
            rows = CausalRows(model, rows_prompts, pad_id, use_cache, pad_multiple, full_logits)
        if decoding.mode == "beam":
            return beam_search(rows, len(prompts), decoding.beams, max_new_tokens,
                               1.0 if decoding.length_penalty is None else decoding.length_penalty,
                               eos_id, vocab_limit)
        return _one_path(rows, len(prompts), decoding, max_new_tokens, eos_id, seed, vocab_limit, on_token)
    finally:
        model.train(was_training)


def _one_path(rows: Rows, n: int, decoding: Decoding, max_new_tokens: int, eos_id: int | None, seed: int,
              vocab_limit: int | None, on_token: OnToken | None = None) -> list[list[int]]:
    """Greedy or sampled continuation of every row; rows leave the batch when they emit EOS."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(n)]
    active = list(range(n))  # prompt index of each row still in the batch
    for step in range(max_new_tokens):
        logits = limit_vocab(rows.logits(), vocab_limit)
        if decoding.mode == "greedy":
            tokens = logits.argmax(-1)
        else:
            tokens = sample_tokens(logits, generator, decoding.temperature or 1.0, decoding.top_k, decoding.top_p)
        chosen = tokens.tolist()
        for row, token in zip(active, chosen, strict=True):
            out[row].append(token)
            if on_token is not None:
                on_token(row, token)
        if step + 1 == max_new_tokens:
            break
        if eos_id is not None and eos_id in chosen:
            keep = [i for i, token in enumerate(chosen) if token != eos_id]
            if not keep:
                break
            index = torch.tensor(keep, device=tokens.device)
            rows.reorder(index)
            tokens, active = tokens[index], [active[i] for i in keep]
        rows.append(tokens)
    return out
