"""Text generation (`bigtrain.inference.generate`, `bigtrain generate`): the KV cache changes no token, batching
changes no token, beam search finds what exhaustive search finds and chooses what transformers chooses,
sampling is reproducible, EOS stops a row; the command end to end and its errors; tensor parallelism (TP=2,
with and without the cache, and under sequence parallelism) generates the one-device model's tokens; the
trainer's final sample under parallel layouts.

Models are tiny and random, their matrices redrawn with a wide spread (`lively`) so that next-token
distributions are far from uniform: token-for-token comparisons are then meaningful."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bigtrain.cli import main as cli_main
from bigtrain.config import config_to_dict, load_config
from bigtrain.data import ByteTokenizer
from bigtrain.distributed.rendezvous import free_port
from bigtrain.errors import GenerationError
from bigtrain.inference.decoder_rows import CausalRows, Seq2SeqRows
from bigtrain.inference.generate import Decoding, generate
from bigtrain.models import TransformerLM, build_model, resolve_vocab_size
from tests.conftest import (
    GPT2_OPTIONS,
    REPO,
    T5_OPTIONS,
    TINY_MODEL,
    launch_ok,
    require_module,
    run_launcher,
    tiny_overrides,
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


# --- the command ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def causal_run(tmp_path_factory) -> Path:
    """A tiny causal run, trained 10 steps; its final sample printed (the trainer uses `generate`)."""
    run_dir = tmp_path_factory.mktemp("generate") / "run"
    proc = run_launcher(tiny_overrides(run_dir, "causal", "train.steps=10", "train.sample_tokens=16"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--- sample (16 tokens after 'def ') ---\ndef " in proc.stdout
    return run_dir


def _weights_folder(path: Path, family: str) -> Path:
    """A folder like `bigtrain export` writes (model.safetensors + config.yaml), of random tiny weights."""
    from safetensors.torch import save_file

    cfg = load_config(None, tiny_overrides(path / "run", family))
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, ByteTokenizer.vocab_size), "cpu", seed=0)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"},
              str(path / "model.safetensors"))
    (path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def _completions(out: str) -> list[str]:
    return out.split("--- ")[1:]


@pytest.mark.launches
def test_command_generates_from_a_run_and_its_export(causal_run, tmp_path, capsys):
    """`bigtrain generate RUN --prompt ... --prompt ...`: one completion per prompt; the same with --no-cache and
    from the `bigtrain export` folder; sampling repeats with its seed; beam search runs."""
    base = [str(causal_run), "--prompt", "def ", "--prompt", "", "--max-new-tokens", "12"]
    assert cli_main(["generate", *base]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("--- 1/2: 'def ' (") and "--- 2/2: '' (" in greedy
    assert len(_completions(greedy)) == 2 and "\ndef " in greedy
    assert cli_main(["generate", *base, "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy
    assert cli_main(["export", str(causal_run), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert cli_main(["generate", str(tmp_path / "export"), *base[1:], "train.device=cpu"]) == 0
    assert capsys.readouterr().out == greedy
    sampled = [*base, "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "5"]
    assert cli_main(["generate", *sampled]) == 0
    first = capsys.readouterr().out
    assert cli_main(["generate", *sampled]) == 0
    assert capsys.readouterr().out == first
    assert cli_main(["generate", *base, "--beams", "3", "--length-penalty", "0.8"]) == 0
    assert len(_completions(capsys.readouterr().out)) == 2


def test_command_generates_from_a_seq2seq_model(tmp_path, capsys):
    folder = _weights_folder(tmp_path / "weights", "seq2seq")
    assert cli_main(["generate", str(folder), "--prompt", "abc", "--prompt", "hello", "--max-new-tokens", "5",
                     "--beams", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 1/2: 'abc' (") and "--- 2/2: 'hello' (" in out


@pytest.mark.parametrize("flags, expected", [
    (["--beams", "4", "--temperature", "0.7"], "--beams 4 cannot be combined with --temperature 0.7"),
    (["--greedy", "--top-k", "5"], "--greedy cannot be combined with --top-k 5"),
    (["--length-penalty", "2"], "--length-penalty 2.0 applies to beam search only"),
    (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give at least 1"),
    (["--beams", "0"], "--beams 0: the number of beams must be >= 1"),
])
def test_command_refuses_contradictory_flags(tmp_path, capsys, flags, expected):
    """Checked before any weights are read (the path does not even exist)."""
    assert cli_main(["generate", str(tmp_path / "nothing"), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err


def test_command_refuses_a_masked_model_and_a_wrong_path(tmp_path, capsys):
    folder = _weights_folder(tmp_path / "masked", "masked")
    assert cli_main(["generate", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "model.family=masked has no generation" in err and "use" in err and err.count("\n") == 1
    assert cli_main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "holds no weights bigtrain knows" in capsys.readouterr().err


# --- parallel layouts -------------------------------------------------------------------------------------------
@pytest.mark.launches
def test_tensor_parallel_generation_matches_one_device(tmp_path):
    """TP=2 (gloo, tests/helpers/tensor_generation.py): greedy with the cache, without it, and under sequence
    parallelism (recomputed, padded to the tensor size), and beam search: the one-device model's tokens, for
    causal (learned, GPT-2, rotary + GQA) and seq2seq (guide, T5) models."""
    out = tmp_path / "generation.jsonl"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={free_port()}", str(REPO / "tests" / "helpers" / "tensor_generation.py"),
                           str(out)], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"] for r in records] == ["causal", "causal-modern-gqa", "gpt2", "seq2seq", "t5"]
    for r in records:
        assert r["cached"] == r["uncached"] == r["sequence_parallel"] == r["reference"], r["case"]
        assert r["beam"] == r["reference_beam"], r["case"]


@pytest.mark.launches
@pytest.mark.parametrize("layout", [("parallel.tensor=2",), ("parallel.tensor=2", "parallel.sequence_parallel=true"),
                                    ("parallel.zero_stage=3", "train.micro_batch_size=4")],
                         ids=["tp", "tp+sp", "zero3"])
def test_trainer_sample_under_parallel_layouts(tmp_path, layout):
    """The final sample is printed (once) under tensor parallelism (vocabulary shards gathered), sequence
    parallelism (recomputed, padded to the tensor size) and ZeRO-3 (every rank in every forward)."""
    out = launch_ok(2, tiny_overrides(tmp_path / "run", "causal", "train.steps=2", "train.sample_tokens=12",
                                      *layout))
    assert out.count("--- sample (12 tokens after 'def ') ---\ndef ") == 1


@pytest.mark.launches
@pytest.mark.parametrize("extra", [(), ("parallel.sequence_parallel=true",)], ids=["tp2", "tp2-sp"])
def test_command_under_tensor_parallelism_prints_the_one_device_text(tmp_path, capsys, extra):
    """`torchrun --nproc_per_node 2 -m bigtrain.cli generate WEIGHTS ...`: the model split over two
    tensor-parallel ranks, each reading its shards; printed once, the one-device text (greedy and 4 beams).
    The weights are random with a wide spread (`lively`), so that no two next tokens are near a tie: summation
    order differs between one device and two shards, and must not decide a token."""
    folder = _weights_folder(tmp_path / "weights", "causal")
    from safetensors.torch import load_file, save_file

    cfg = load_config(None, tiny_overrides(tmp_path / "run", "causal"))
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, ByteTokenizer.vocab_size), "cpu", seed=0)
    model.load_state_dict({**load_file(str(folder / "model.safetensors"))}, strict=False)
    lively(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"},
              str(folder / "model.safetensors"))
    torchrun = Path(sys.executable).parent / "torchrun"
    for flags in (["--greedy"], ["--beams", "4", "--length-penalty", "0.8"]):
        args = [str(folder), "--prompt", "def ", "--prompt", "import os", "--max-new-tokens", "10", *flags]
        assert cli_main(["generate", *args]) == 0
        one_device = capsys.readouterr().out
        proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                               f"--master_port={free_port()}", "-m", "bigtrain.cli", "generate", *args, *extra],
                              capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert proc.stdout[proc.stdout.find("--- 1/2"):] == one_device  # after DeepSpeed's start-up lines
