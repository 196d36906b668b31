"""Text generation (`bigtrain.inference.generate`, `bigtrain generate`): the KV cache changes no token, batching
changes no token, beam search finds what exhaustive search finds and chooses what transformers chooses,
sampling is reproducible, EOS stops a row; bad requests are one clear error. The command and parallel layouts:
tests/test_generate_command.py.

Models are tiny and random, their matrices redrawn with a wide spread (`lively`) so that next-token
distributions are far from uniform: token-for-token comparisons are then meaningful."""

from __future__ import annotations

import itertools

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.errors import GenerationError
from bigtrain.inference.decoder_rows import CausalRows, Seq2SeqRows
from bigtrain.inference.generate import Decoding, generate
from bigtrain.models import TransformerLM, build_model
from tests.conftest import (
    GPT2_OPTIONS,
    T5_OPTIONS,
    TINY_MODEL,
    require_module,
)
from tests.helpers.tensor_generation import lively

VOCAB, BOS = 48, 1
ROTARY_GQA = ("model.positions=rotary", "model.n_kv_heads=2", "model.norm_position=pre", "model.norm=rmsnorm",
              "model.activation=swiglu", "model.tie_embeddings=false")
CAUSAL = {"sinusoidal": (), "learned-gpt2": GPT2_OPTIONS, "rotary-gqa": ROTARY_GQA, "relative": T5_OPTIONS}
SEQ2SEQ = {"seq2seq": (), "seq2seq-rotary-gqa": ROTARY_GQA, "seq2seq-t5": T5_OPTIONS}
PROMPTS = [[5, 17, 33, 2, 40, 9, 11], [40, 41], [7, 7, 12, 30]]


def tiny(family: str, *options: str, vocab: int = VOCAB, seed: int = 0) -> TransformerLM:
    data = ["data.source=reverse"] if family == "seq2seq" else []
    cfg = load_config(None, [f"model.family={family}", *TINY_MODEL, "data.seq_len=32", *data, *options]).model
    return lively(build_model(cfg, vocab, "cpu", seed=seed), seed)


def model_of(case: str, **kw) -> TransformerLM:
    family = "seq2seq" if case in SEQ2SEQ else "causal"
    return tiny(family, *{**CAUSAL, **SEQ2SEQ}[case], **kw)


ALL_CASES = [*CAUSAL, *SEQ2SEQ]


# --- the cache and batching change nothing ---------------------------------------------------------------------
@pytest.mark.parametrize("case", ALL_CASES)
def test_cache_and_batching_change_no_token(case):
    """Greedy and beam search with the cache == without it, token for token; a left-padded (causal) or
    right-padded (seq2seq source) batch == each prompt alone."""
    model = model_of(case)
    batched = generate(model, PROMPTS, 16, bos_id=BOS)
    assert generate(model, PROMPTS, 16, bos_id=BOS, use_cache=False) == batched
    assert [generate(model, [p], 16, bos_id=BOS)[0] for p in PROMPTS] == batched
    beam = generate(model, PROMPTS, 10, Decoding(beams=3, length_penalty=0.6), eos_id=3, bos_id=BOS)
    assert generate(model, PROMPTS, 10, Decoding(beams=3, length_penalty=0.6), eos_id=3, bos_id=BOS,
                    use_cache=False) == beam


@pytest.mark.parametrize("case", ALL_CASES)
def test_step_logits_with_cache_equal_recomputation(case):
    """Logits of every step (the same tokens fed) with the cache within 1e-5 of full recomputation, padded
    rows included: stronger than equal argmaxes."""
    model = model_of(case)
    make = Seq2SeqRows if case in SEQ2SEQ else CausalRows
    extra = {"bos_id": BOS} if case in SEQ2SEQ else {}
    cached, full = (make(model, PROMPTS, 0, use_cache=flag, **extra) for flag in (True, False))
    feed = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(12):
            a, b = cached.logits(), full.logits()
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
            tokens = torch.randint(0, VOCAB, (len(PROMPTS),), generator=feed)
            cached.append(tokens)
            full.append(tokens)
        rows = torch.tensor([2, 0])  # dropping and reordering rows keeps the cache aligned
        cached.reorder(rows)
        full.reorder(rows)
        assert torch.allclose(cached.logits(), full.logits(), atol=1e-5)


def test_generation_slides_past_max_seq_len():
    """Past model.max_seq_len a causal model sees the last window of tokens: the cache gives way to
    recomputation there, with the same tokens as recomputing throughout."""
    model = tiny("causal", "model.max_seq_len=16", "data.seq_len=16")
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], list(range(20, 40))]  # the second is longer than the window
    out = generate(model, prompts, 24)
    assert [len(o) for o in out] == [24, 24]
    assert generate(model, prompts, 24, use_cache=False) == out


# --- beam search ------------------------------------------------------------------------------------------------
def _sequence_log_prob(model: TransformerLM, prompt: list[int], seq: list[int]) -> float:
    """Σ log p(seq_i | prompt, seq_<i) by one full forward."""
    with torch.no_grad():
        if model.family == "seq2seq":
            memory = model.encode(torch.tensor([prompt]))
            logits = model.decode(torch.tensor([[BOS, *seq[:-1]]]), memory)[0]
        else:
            logits = model(torch.tensor([prompt + seq[:-1]]))[0, len(prompt) - 1:]
    log_probs = logits.float().log_softmax(-1)
    return float(sum(log_probs[i, token] for i, token in enumerate(seq)))


def _exhaustive(model: TransformerLM, prompt: list[int], vocab: int, new: int, eos: int, alpha: float
                ) -> tuple[list[int], float]:
    """The best of every possible output: sequences that end at their first EOS, or reach `new` tokens,
    scored Σ log p / length^alpha."""
    best: tuple[list[int], float] = ([], float("-inf"))
    for length in range(1, new + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos in seq[:-1] or (length < new and seq[-1] != eos):
                continue
            score = _sequence_log_prob(model, prompt, list(seq)) / length ** alpha
            if score > best[1]:
                best = (list(seq), score)
    return best


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_beam_search_finds_the_exhaustive_best(family, alpha):
    """Vocabulary 5, 3 new tokens, EOS 4: with 5² = 25 beams the search keeps every live prefix, so its answer
    is the best of all outputs under score = Σ log p / length^alpha (EOS counted in the length). Three models,
    two prompts in one batch; greedy decoding misses the best at least once (the search is not trivial)."""
    vocab, new, eos = 5, 3, 4
    prompts, greedy_missed = [[0, 2, 1], [3, 3]], 0
    for seed in range(3):
        model = tiny(family, *ROTARY_GQA, vocab=vocab, seed=seed)
        found = generate(model, prompts, new, Decoding(beams=vocab ** (new - 1), length_penalty=alpha),
                         eos_id=eos, bos_id=BOS)
        greedy = generate(model, prompts, new, eos_id=eos, bos_id=BOS)
        for prompt, tokens, first_choice in zip(prompts, found, greedy, strict=True):
            best, score = _exhaustive(model, prompt, vocab, new, eos, alpha)
            assert tokens == best, (seed, prompt, tokens, best, score)
            greedy_missed += first_choice != best
    assert greedy_missed >= 1


def _transformers_wrapper(model: TransformerLM):
    """`model` behind transformers' generation API (no cache: every step recomputes the whole sequence)."""
    transformers = require_module("transformers", "transformers is a test dependency (pip install .[dev])")
    from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, Seq2SeqLMOutput

    class Config(transformers.PretrainedConfig):
        model_type = "bigtrain_generation_test"

    class Encoder(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return BaseModelOutput(last_hidden_state=model.encode(input_ids, attention_mask.bool()))

    class Wrapped(transformers.PreTrainedModel, transformers.GenerationMixin):
        config_class = Config

        def __init__(self, config) -> None:
            super().__init__(config)
            self.inner = model

        def get_encoder(self):
            return Encoder()

        def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                    **kwargs):
            mask = attention_mask.bool()
            if self.config.is_encoder_decoder:
                return Seq2SeqLMOutput(logits=model.decode(decoder_input_ids, encoder_outputs[0], mask))
            padded = not bool(mask.all())
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            return CausalLMOutput(logits=model(input_ids, attention_mask=mask if padded else None,
                                               position_ids=positions if padded else None))

    config = Config(vocab_size=model.vocab_size, is_encoder_decoder=model.family == "seq2seq",
                    decoder_start_token_id=BOS)
    return Wrapped(config).eval(), transformers.GenerationConfig


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_beam_search_chooses_what_transformers_chooses(family):
    """The same model behind transformers' `generate(num_beams=B, length_penalty=α, do_sample=False)`: the same
    tokens for a padded batch, across beams 2-5, α in {-1, 0, 0.5, 1, 2}, EOS hit or not, the cache on or off,
    and a vocabulary limit (transformers: suppress_tokens)."""
    vocab, eos, new = 12, 3, 8
    for seed in range(10):
        model = tiny(family, vocab=vocab, seed=seed)
        hf, generation_config = _transformers_wrapper(model)
        gen = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (3, 5, 2)]
        beams, alpha, limit = 2 + seed % 4, [0.5, 1.0, 2.0, -1.0, 0.0][seed % 5], (10 if seed % 2 else None)
        ours = generate(model, prompts, new, Decoding(beams=beams, length_penalty=alpha), eos_id=eos, pad_id=0,
                        bos_id=BOS, use_cache=bool(seed % 3), vocab_limit=limit)
        width = max(map(len, prompts))
        if family == "seq2seq":
            ids = [p + [0] * (width - len(p)) for p in prompts]
            mask = [[1] * len(p) + [0] * (width - len(p)) for p in prompts]
        else:
            ids = [[0] * (width - len(p)) + p for p in prompts]
            mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        config = generation_config(num_beams=beams, length_penalty=alpha, do_sample=False, max_new_tokens=new,
                                   eos_token_id=eos, pad_token_id=0, use_cache=False, early_stopping=False,
                                   decoder_start_token_id=BOS,
                                   suppress_tokens=list(range(limit, vocab)) if limit else None)
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=config)
        theirs = []
        for row in out[:, 1 if family == "seq2seq" else width:].tolist():
            end = row.index(eos) + 1 if eos in row else new
            theirs.append(row[:end])
        assert ours == theirs, (seed, beams, alpha)


# --- sampling, EOS, options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["learned-gpt2", "seq2seq-t5"])
def test_sampling_is_reproducible_and_filters_reduce_to_greedy(case):
    model = model_of(case)
    kw = dict(bos_id=BOS)
    drawn = generate(model, PROMPTS, 20, Decoding(temperature=1.0), seed=7, **kw)
    assert generate(model, PROMPTS, 20, Decoding(temperature=1.0), seed=7, **kw) == drawn
    assert generate(model, PROMPTS, 20, Decoding(temperature=1.0), seed=8, **kw) != drawn
    greedy = generate(model, PROMPTS, 20, **kw)
    assert drawn != greedy
    assert generate(model, PROMPTS, 20, Decoding(top_k=1), seed=3, **kw) == greedy
    assert generate(model, PROMPTS, 20, Decoding(top_p=1e-9), seed=3, **kw) == greedy
    assert generate(model, PROMPTS, 20, Decoding(temperature=0.7, top_k=5, top_p=0.9), seed=3, **kw) == \
        generate(model, PROMPTS, 20, Decoding(temperature=0.7, top_k=5, top_p=0.9), seed=3, use_cache=False, **kw)


def test_vocab_limit_is_never_crossed():
    """Ids >= vocab_limit (padding rows of the embedding) are never chosen, even at a high temperature."""
    model = tiny("causal")
    for decoding in (Decoding(), Decoding(temperature=20.0), Decoding(beams=3)):
        out = generate(model, PROMPTS, 30, decoding, vocab_limit=10, eos_id=3)
        assert max(max(row) for row in out) < 10


@pytest.mark.parametrize("case", ["sinusoidal", "seq2seq"])
def test_eos_stops_each_row(case):
    """A row ends at its first EOS (kept); the others go on exactly as without an EOS."""
    model = model_of(case)
    free = generate(model, PROMPTS, 16, bos_id=BOS)
    eos = free[0][2]  # prompt 0 stops at its third token
    for use_cache in (True, False):
        stopped = generate(model, PROMPTS, 16, eos_id=eos, bos_id=BOS, use_cache=use_cache)
        assert stopped == [row[:row.index(eos) + 1] if eos in row else row for row in free]
    assert len(stopped[0]) <= 3


def test_bad_requests_raise_one_clear_error():
    causal = tiny("causal")
    for options, expected in ((dict(beams=4, temperature=0.7), "beams=4 cannot be combined with temperature"),
                              (dict(greedy=True, top_k=3), "greedy=True cannot be combined with top_k=3"),
                              (dict(length_penalty=2.0), "applies to beam search only"),
                              (dict(temperature=0.0), "temperature=0.0 must be > 0"),
                              (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
                              (dict(beams=0), "beams=0")):
        with pytest.raises(GenerationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            Decoding(**options)
    with pytest.raises(GenerationError, match="model.family=masked has no generation"):
        generate(tiny("masked"), PROMPTS, 4)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(causal, [[1], []], 4)
    with pytest.raises(GenerationError, match="pass bos_id"):
        generate(tiny("seq2seq"), PROMPTS, 4)
    with pytest.raises(GenerationError, match="max_new_tokens=65 needs 65 decoder positions"):
        generate(tiny("seq2seq"), PROMPTS, 65, bos_id=BOS)
    assert generate(causal, PROMPTS, 0) == [[], [], []]
