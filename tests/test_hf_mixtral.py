"""Mixture-of-experts models and transformers' Mixtral (issue 29 item 4): `bigtrain export --format hf` writes a
causal MoE model (rotary, pre-norm RMSNorm, SwiGLU experts, no biases, MoE in every block, dropless, no shared
experts) as `MixtralForCausalLM` with the same logits, and `model.init_from` reads a transformers-saved Mixtral
with transformers' logits; what Mixtral lacks is refused naming the key. Fast tier: `bigtrain export` runs in this
process, no launch.

Models are tiny and random (every parameter perturbed, routers included: the router's top-k differs from token to
token, so every expert runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.checkpoint.state import StateAdapter
from bigtrain.config.loader import load_config
from bigtrain.engine.base import ShardedState
from bigtrain.errors import CheckpointError, ConfigError
from bigtrain.interop import init_source
from bigtrain.interop.hf_config import hf_kind
from bigtrain.models import build_model
from tests.conftest import TINY_MODEL, require
from tests.test_hf_interop import LLAMA_OPTIONS, VOCAB, _bigtrain_folder, _perturbed

try:
    import transformers
except ImportError:  # a test dependency: pip install -e .[dev]
    transformers = None

# Llama with grouped-query attention and no biases (LLAMA_OPTIONS), every block an MoE block of 4 SwiGLU experts
# of width 48, top-2; transformers' Mixtral rotary base (1e6) and norm epsilon.
MIXTRAL_OPTIONS = ("model.family=causal", *TINY_MODEL, *LLAMA_OPTIONS, "model.moe.experts=4", "model.moe.top_k=2",
                   "model.moe.d_ff=48", "model.rope_theta=1000000.0", "model.norm_eps=1e-5", "data.seq_len=32")
VARIANTS = {"top2-untied": [], "top1-tied-3-experts": ["model.moe.experts=3", "model.moe.top_k=1",
                                                       "model.tie_embeddings=true"]}


@pytest.fixture(autouse=True)
def _needs_transformers() -> None:
    require(transformers is not None, "transformers is not installed (pip install -e .[dev])")


def _config(*extra: str):
    return load_config(None, [*MIXTRAL_OPTIONS, *extra])


def _export(source: Path, out: Path, capsys) -> tuple[int, str]:
    """`bigtrain export SOURCE --format hf --out OUT`, in this process: (exit status, stderr)."""
    from bigtrain.cli.tools import run_export

    status = run_export([str(source), "--format", "hf", "--out", str(out)])
    return status, capsys.readouterr().err


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _max_diff(model, hf) -> float:
    ids = _ids()
    return (model(ids) - hf(input_ids=ids).logits).abs().max().item()


def _saved_mixtral(folder: Path, seed: int = 3, **options):
    """A random transformers Mixtral (every parameter perturbed), saved with save_pretrained."""
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False, **options)
    hf = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_model_exports_to_mixtral_with_the_same_logits(tmp_path, capsys, variant):
    cfg = _config(*VARIANTS[variant])
    model = _perturbed(cfg)
    status, err = _export(_bigtrain_folder(cfg, model, tmp_path / "bigtrain"), tmp_path / "hf", capsys)
    assert status == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    moe = cfg.model.moe
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == \
        (moe.experts, moe.top_k, 48)
    assert config["sliding_window"] is None and config["tie_word_embeddings"] == cfg.model.tie_embeddings
    # The published layout: one w1 / w2 / w3 linear per expert, the router as `gate`.
    names = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert {f"model.layers.1.block_sparse_moe.experts.{moe.experts - 1}.{w}.weight" for w in ("w1", "w2", "w3")} | \
        {"model.layers.0.block_sparse_moe.gate.weight"} <= names
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    diff = _max_diff(model, hf)
    print(f"\nexport Mixtral ({variant}): max |logit difference| {diff:.1e}")  # pytest -s shows it
    assert diff <= 1e-4, (variant, diff)


def test_init_from_a_transformers_mixtral_gives_the_same_logits_and_exports_back_bitwise(tmp_path, capsys):
    hf = _saved_mixtral(tmp_path / "hf")
    cfg = _config(f"model.init_from={tmp_path / 'hf'}")
    model = build_model(cfg.model, VOCAB, "cpu", seed=0).eval()
    StateAdapter(ShardedState(model, {}, torch.optim.AdamW(model.parameters()))).restore(
        init_source(cfg.model, VOCAB), 0.0)
    diff = _max_diff(model, hf)
    with capsys.disabled():  # pytest -s shows it
        print(f"\nimport Mixtral: max |logit difference| {diff:.1e}")
    assert diff <= 1e-4, diff
    # Exported again, every tensor is transformers' own, bitwise (Q, K, V joined and split; experts by name).
    status, err = _export(_bigtrain_folder(cfg, model, tmp_path / "bigtrain"), tmp_path / "back", capsys)
    assert status == 0, err
    before, after = load_file(str(tmp_path / "hf" / "model.safetensors")), \
        load_file(str(tmp_path / "back" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("extra,named", [
    (["model.moe.every=2"], "model.moe.every=2"),
    (["model.moe.shared_experts=1"], "model.moe.shared_experts=1"),
    (["model.moe.capacity_factor=1.25"], "model.moe.capacity_factor=1.25"),
    (["model.bias=true"], "model.bias=True"),
    (["model.positions=sinusoidal"], "model.positions='sinusoidal'"),
], ids=["every", "shared", "capacity", "bias", "sinusoidal"])
def test_export_refuses_moe_options_mixtral_lacks(extra, named):
    with pytest.raises(ValueError) as info:
        hf_kind(_config(*extra).model)
    message = str(info.value)
    assert named in message and "Mixtral" in message, message


def test_export_refusal_writes_nothing_and_other_families_name_the_experts(tmp_path, capsys):
    cfg = _config("model.moe.shared_experts=1", "model.moe.every=2")
    status, err = _export(_bigtrain_folder(cfg, _perturbed(cfg), tmp_path / "bigtrain"), tmp_path / "hf", capsys)
    assert status != 0 and "Traceback" not in err, err
    assert "model.moe.shared_experts=1" in err and "model.moe.every=2" in err, err
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    masked = load_config(None, ["model.family=masked", *TINY_MODEL, "model.moe.experts=4", "data.seq_len=32"])
    with pytest.raises(ValueError, match=r"model.moe.experts=4 \(transformers' BERT has no mixture-of-experts"):
        hf_kind(masked.model)


def test_init_from_a_mixtral_names_what_differs(tmp_path):
    _saved_mixtral(tmp_path / "hf")
    cfg = _config(f"model.init_from={tmp_path / 'hf'}", "model.moe.experts=8", "model.moe.d_ff=null")
    with pytest.raises(ConfigError) as info:
        init_source(cfg.model, VOCAB)
    message = str(info.value)
    assert "model.moe.experts=8 here, 4 there" in message and "model.moe.d_ff=64 here, 48 there" in message
    assert "Set model.moe.experts=4 model.moe.d_ff=48" in message, message
    dense = load_config(None, ["model.family=causal", *TINY_MODEL, *LLAMA_OPTIONS, "model.rope_theta=1000000.0",
                               "model.norm_eps=1e-5", "data.seq_len=32", f"model.init_from={tmp_path / 'hf'}"])
    with pytest.raises(ConfigError, match="model.moe.experts=0 here, 4 there"):
        init_source(dense.model, VOCAB)
    _saved_mixtral(tmp_path / "windowed", sliding_window=16)
    with pytest.raises(CheckpointError, match="sliding_window=16"):
        init_source(_config(f"model.init_from={tmp_path / 'windowed'}").model, VOCAB)


def test_init_from_a_transformers_llama_into_a_moe_run_names_the_experts(tmp_path):
    from tests.test_hf_interop import _hf_saved

    _hf_saved("llama", tmp_path / "llama")
    cfg = _config(f"model.init_from={tmp_path / 'llama'}", "model.rope_theta=10000.0", "model.norm_eps=1e-6")
    with pytest.raises(ConfigError, match="model.moe.experts=4 here, 0 there.*Set model.moe.experts=0"):
        init_source(cfg.model, VOCAB)
