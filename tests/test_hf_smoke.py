"""The smoke model goes to Hugging Face (issue 25): configs/smoke.yaml's architecture (causal, rotary, pre-norm
LayerNorm with biases, GELU, tied embeddings scaled by sqrt(d_model)) exports to transformers' GPT-NeoX with the
same logits and reads back through `model.init_from`; a byte-tokenizer export ships a tokenizer that
`AutoTokenizer` loads and that encodes as bigtrain does. Fast tier: `bigtrain export` runs in this process.

Models are tiny and random (every parameter perturbed); the smoke run's own checkpoint is checked in
tests/test_smoke.py (launches tier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint.state import StateAdapter
from bigtrain.config.loader import load_config
from bigtrain.data.tokenizer import ByteTokenizer, HFTokenizer
from bigtrain.engine.base import ShardedState
from bigtrain.errors import CheckpointError, ConfigError
from bigtrain.interop import init_source
from bigtrain.models import build_model
from tests.conftest import REPO, require
from tests.test_hf_interop import VOCAB, _bigtrain_folder, _perturbed, _strip

try:
    import transformers
except ImportError:  # a test dependency: pip install -e .[dev]
    transformers = None

SMOKE_TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.max_seq_len=64",
              "data.seq_len=32"]
# The smoke model as configs/smoke.yaml has it (scaled, tied), and the other ways scale and tie combine; d_model=32
# makes sqrt(d_model) irrational, so folding it is rounded, not exact as a power of two would be.
VARIANTS = {"smoke": [], "untied-scaled": ["model.tie_embeddings=false"],
            "tied-unscaled": ["model.scale_embeddings=false"],
            "untied-unscaled-gelu_tanh": ["model.tie_embeddings=false", "model.scale_embeddings=false",
                                          "model.activation=gelu_tanh", "model.rope_theta=500.0"]}
TEXTS = ["def f(x):\n    return x + 1\n", "Café crème, naïve résumé", "漢字とかな", "emoji 🙂🚀 and ZWJ 👩‍💻",
         "  leading spaces\tand tabs\r\nwindows line\n\n\nblank lines  ", "</s> <s> <pad> spell special tokens",
         "", " "]


@pytest.fixture(autouse=True)
def _needs_transformers() -> None:
    require(transformers is not None, "transformers is not installed (pip install -e .[dev])")


def _smoke_config(*extra: str):
    return load_config(REPO / "configs/smoke.yaml", [*SMOKE_TINY, *extra])


def _export(source: Path, out: Path, capsys) -> tuple[int, str]:
    """`bigtrain export SOURCE --format hf --out OUT`, in this process: (exit status, stderr)."""
    from bigtrain.cli.tools import run_export

    status = run_export([str(source), "--format", "hf", "--out", str(out)])
    return status, capsys.readouterr().err


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _max_diff(model, hf, ids: torch.Tensor) -> float:
    return (model(ids) - hf(input_ids=ids).logits).abs().max().item()


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory):
    """The perturbed smoke-architecture model and its `bigtrain export --format hf` folder."""
    cfg = _smoke_config()
    folder = tmp_path_factory.mktemp("smoke-export")
    model = _perturbed(cfg, seed=7)
    from bigtrain.cli.tools import run_export

    assert run_export([str(_bigtrain_folder(cfg, model, folder / "bigtrain")), "--format", "hf",
                       "--out", str(folder / "hf")]) == 0
    return model, folder / "hf"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_smoke_architecture_exports_to_gpt_neox_with_the_same_logits(tmp_path, capsys, variant):
    cfg = _smoke_config(*VARIANTS[variant])
    model = _perturbed(cfg)
    status, err = _export(_bigtrain_folder(cfg, model, tmp_path / "bigtrain"), tmp_path / "hf", capsys)
    assert status == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["architectures"] == ["GPTNeoXForCausalLM"]
    assert config["use_parallel_residual"] is False and config["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert config["tie_word_embeddings"] == cfg.model.tie_embeddings  # a scaled tied head stays tied
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.rope_parameters["rope_theta"] == cfg.model.rope_theta
    diff = _max_diff(model, hf, _ids())
    print(f"\nexport smoke architecture ({variant}): max |logit difference| {diff:.1e}")
    assert diff <= 1e-4, (variant, diff)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_init_from_a_transformers_gpt_neox_gives_the_same_logits(tmp_path, tied):
    torch.manual_seed(3)
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_act="gelu", max_position_embeddings=64, layer_norm_eps=1e-5, use_parallel_residual=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        tie_word_embeddings=tied)
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    cfg = _smoke_config("model.scale_embeddings=false", f"model.tie_embeddings={str(tied).lower()}",
                        f"model.init_from={tmp_path / 'hf'}")
    model = build_model(cfg.model, VOCAB, "cpu", seed=0).eval()
    StateAdapter(ShardedState(model, {}, torch.optim.AdamW(model.parameters()))).restore(
        init_source(cfg.model, VOCAB), 0.0)
    diff = _max_diff(model, hf, _ids())
    print(f"\nimport GPT-NeoX ({'tied' if tied else 'untied'}): max |logit difference| {diff:.1e}")
    assert diff <= 1e-4, diff


def test_an_export_of_a_scaled_model_reads_back_into_an_unscaled_run(tmp_path, smoke_export):
    """The exported folder is an ordinary GPT-NeoX: a run with the scale folded out reads it with its logits."""
    model, folder = smoke_export
    hf_eps = json.loads((folder / "config.json").read_text())["layer_norm_eps"]
    cfg = _smoke_config("model.scale_embeddings=false", f"model.norm_eps={hf_eps}", f"model.init_from={folder}")
    back = build_model(cfg.model, VOCAB, "cpu", seed=0).eval()
    StateAdapter(ShardedState(back, {}, torch.optim.AdamW(back.parameters()))).restore(
        init_source(cfg.model, VOCAB), 0.0)
    with torch.no_grad():
        assert (back(_ids()) - model(_ids())).abs().max().item() <= 1e-4
    with pytest.raises(ConfigError) as info:  # the smoke config itself is told what to set
        init_source(_smoke_config(f"model.init_from={folder}").model, VOCAB)
    assert "model.scale_embeddings=True here, False there" in str(info.value)
    assert f"model.norm_eps={hf_eps} model.scale_embeddings=false" in str(info.value)


@pytest.mark.parametrize("extra,named", [
    (["model.activation=swiglu"], "model.activation='swiglu' (GPT-NeoX takes relu, gelu or gelu_tanh)"),
    (["model.n_kv_heads=2"], "model.n_kv_heads=2 (GPT-NeoX has no grouped-query attention)"),
    (["model.norm_position=post"], "model.norm_position='post' (transformers' GPT-NeoX needs 'pre')"),
    (["model.bias=false"], "model.bias=False (transformers' GPT-NeoX needs True)"),
    (["model.scale_tied_output=true"], "model.scale_tied_output=True"),
], ids=["swiglu", "gqa", "post-norm", "no-bias", "scaled-output"])
def test_export_refuses_what_gpt_neox_lacks_by_name(tmp_path, capsys, extra, named):
    cfg = _smoke_config(*extra)
    status, err = _export(_bigtrain_folder(cfg, _perturbed(cfg), tmp_path / "bigtrain"), tmp_path / "hf", capsys)
    assert status == 2 and named in err and "GPT-NeoX" in err and "Traceback" not in err, err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("change,named", [
    ({"use_parallel_residual": True}, "use_parallel_residual=true"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
     "partial_rotary_factor / rotary_pct=0.25"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                          "partial_rotary_factor": 1.0}}, "rope_type='linear'"),
    ({"attention_bias": False}, "attention_bias=false"),
], ids=["parallel-residual", "partial-rotary", "scaled-rotary", "no-attention-bias"])
def test_init_from_refuses_gpt_neox_options_without_counterpart(smoke_export, tmp_path, change, named):
    _, folder = smoke_export
    changed = tmp_path / "hf"
    changed.mkdir()
    (changed / "model.safetensors").symlink_to(folder / "model.safetensors")
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="GPT-NeoX options without a bigtrain counterpart") as info:
        init_source(_smoke_config("model.scale_embeddings=false", f"model.init_from={changed}").model, VOCAB)
    assert named in str(info.value)


def test_byte_tokenizer_export_loads_in_auto_tokenizer_with_bigtrains_ids(smoke_export):
    """AutoTokenizer of the folder: bigtrain's byte ids for every text (non-ASCII UTF-8, whitespace, newlines, text
    spelling special tokens), decode gives the text back, and the special ids are bigtrain's (also in
    generation_config.json); the tokenizer.json also reads back as `data.tokenizer` with the same ids."""
    _, folder = smoke_export
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"} <= \
        {p.name for p in folder.iterdir()}
    ours, theirs = ByteTokenizer(), transformers.AutoTokenizer.from_pretrained(folder)
    again = HFTokenizer(folder / "tokenizer.json")
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text) == again.encode(text), text
        assert theirs.decode(ids) == text == again.decode(ids)
    assert (theirs.pad_token_id, theirs.eos_token_id, theirs.mask_token_id, theirs.bos_token_id) == \
        (ours.pad_id, ours.eos_id, ours.mask_id, ours.bos_id) == (again.pad_id, again.eos_id, again.mask_id,
                                                                   again.bos_id)
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == \
        (ours.bos_id, ours.eos_id, ours.pad_id)
    assert theirs.decode([*ours.encode("é"), ours.eos_id], skip_special_tokens=True) == "é"


def test_greedy_generation_equals_transformers_on_the_smoke_export(smoke_export):
    """End to end through the exported files alone: AutoTokenizer encodes two prompts, transformers' greedy
    `generate` on the folder picks the tokens bigtrain's generation picks (left-padded batch, stops at eos)."""
    from bigtrain.inference.generate import Decoding, generate

    model, folder = smoke_export
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(folder).eval()
    texts, tok = ["def main():\n", "é"], ByteTokenizer()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ours = generate(model, [tok.encode(t) for t in texts], 12, Decoding(greedy=True), eos_id=tok.eos_id,
                    pad_id=tok.pad_id, bos_id=tok.bos_id, vocab_limit=None)
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=12, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert ours == [_strip(row[width:].tolist(), tok.eos_id, tok.pad_id) for row in out]
