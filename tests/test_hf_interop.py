"""Hugging Face in and out (issue 14): `bigtrain export --format hf` writes folders that `transformers` loads
with the same logits (GPT-2, Llama with grouped-query attention, BERT, T5), and `model.init_from` starts a run
from a transformers-saved folder (same logits) or a bigtrain checkpoint, under any layout.

The reference is transformers itself (a test dependency); models are tiny and random, with every parameter
perturbed so that zero-initialized biases and norms are exercised too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bigtrain.checkpoint.state import StateAdapter
from bigtrain.checkpoint.weights import load_weights, one_device, with_tied
from bigtrain.config import config_to_dict
from bigtrain.config.loader import load_config
from bigtrain.engine.base import ShardedState
from bigtrain.errors import ConfigError
from bigtrain.interop import init_source
from bigtrain.models import build_model
from bigtrain.models.qkv import join_qkv, qkv_layout, split_qkv
from tests.conftest import (
    BERT_OPTIONS,
    GPT2_OPTIONS,
    T5_OPTIONS,
    TINY_MODEL,
    launch_ok,
    require,
    run_cli,
    single_process,
    tiny_overrides,
)

try:
    import transformers
except ImportError:  # a test dependency: pip install -e .[dev]
    transformers = None


@pytest.fixture(autouse=True)
def _needs_transformers() -> None:
    require(transformers is not None, "transformers is not installed (pip install -e .[dev])")


VOCAB = 320  # the byte tokenizer's 260 ids rounded up to model.vocab_multiple=64
LLAMA_OPTIONS = ("model.norm_position=pre", "model.positions=rotary", "model.norm=rmsnorm", "model.activation=swiglu",
                 "model.n_kv_heads=2", "model.bias=false", "model.scale_embeddings=false", "model.tie_embeddings=false",
                 "model.norm_eps=1e-6")
# Each family as bigtrain options, and the same model as a transformers config.
FAMILIES = {
    "gpt2": ("causal", GPT2_OPTIONS, dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                          n_positions=64, activation_function="gelu_new")),
    "llama": ("causal", LLAMA_OPTIONS, dict(model_type="llama", hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                            head_dim=8, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "bert": ("masked", (*BERT_OPTIONS, "model.norm_eps=1e-12", "model.norm_position=post"),
             dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, type_vocab_size=2)),
    "t5": ("seq2seq", (*T5_OPTIONS, "model.norm_eps=1e-6", "model.activation=relu"),
           dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="relu")),
}
BIGTRAIN = str(Path(sys.executable).parent / "bigtrain")


def _config(kind: str, *extra: str):
    family, options, _ = FAMILIES[kind]
    return load_config(None, [f"model.family={family}", *TINY_MODEL, *options, "data.seq_len=32", *extra])


def _hf_class(kind: str):
    return {"bert": transformers.AutoModelForMaskedLM, "t5": transformers.AutoModelForSeq2SeqLM}.get(
        kind, transformers.AutoModelForCausalLM)


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    return {"ids": ids, "mask": mask, "types": torch.randint(0, 2, (2, 12), generator=gen),
            "dec": torch.randint(3, 256, (2, 7), generator=gen)}


@torch.no_grad()
def _logits(kind: str, model, hf=None) -> torch.Tensor:
    """Logits of the same inputs from a bigtrain model or (hf=True) a transformers one; masked positions of the
    padded row are left out."""
    x = _inputs()
    if kind == "t5":
        if hf:
            return model(input_ids=x["ids"], attention_mask=x["mask"].long(), decoder_input_ids=x["dec"]).logits
        return model(x["ids"], x["dec"], attention_mask=x["mask"])
    if kind == "bert":
        out = (model(input_ids=x["ids"], attention_mask=x["mask"].long(), token_type_ids=x["types"]).logits if hf
               else model(x["ids"], attention_mask=x["mask"], token_type_ids=x["types"]))
        return out[x["mask"]]
    return model(input_ids=x["ids"]).logits if hf else model(x["ids"])


def _perturbed(cfg, seed: int = 1):
    """The model of `seed` plus N(0, 0.05²) noise, drawn parameter by parameter in the order of the separate Q, K, V
    linears of earlier bigtrains (q, k, v weight and bias in turn), so the perturbed model is the one it always was."""
    model = build_model(cfg.model, VOCAB, "cpu", seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    head_dim, groups = qkv_layout(cfg.model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("qkv_proj.bias"):
                continue  # drawn with the weight
            if not name.endswith("qkv_proj.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
                continue
            bias = params.get(name.replace(".weight", ".bias"))
            tensors = [p] + ([bias] if bias is not None else [])
            parts = [split_qkv(t, head_dim, groups) for t in tensors]
            noise: list[list[torch.Tensor]] = [[], []]
            for i in range(3):
                for j in range(len(tensors)):
                    noise[j].append(0.05 * torch.randn(parts[j][i].shape, generator=gen))
            for j, t in enumerate(tensors):
                t.add_(join_qkv(*noise[j], head_dim, groups))
    return model


def _bigtrain_folder(cfg, model, out: Path) -> Path:
    """A `bigtrain export --format safetensors` folder of `model` (what `bigtrain export --format hf` reads)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.model.tie_embeddings:
        state.pop("head.weight")
    save_file(state, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump(one_device(config_to_dict(cfg)), sort_keys=False))
    return out


def _load_bigtrain(path: Path):
    from bigtrain.config.loader import config_from_dict
    from bigtrain.io import load_state

    raw, state = load_weights(path)
    cfg = config_from_dict(raw)
    model = build_model(cfg.model, VOCAB, "cpu").eval()
    load_state(model, with_tied(state, cfg.model.tie_embeddings), path)
    return model


def _export(source: Path, out: Path) -> subprocess.CompletedProcess:
    """`bigtrain export SOURCE --format hf --out OUT`, run in this process (`run_cli`: no interpreter start-up,
    no second import of torch and transformers)."""
    return run_cli("export", str(source), "--format", "hf", "--out", str(out))


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kind):
    cfg = _config(kind)
    model = _perturbed(cfg)
    proc = _export(_bigtrain_folder(cfg, model, tmp_path / "bigtrain"), tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == kind and config["vocab_size"] == VOCAB
    hf = _hf_class(kind).from_pretrained(tmp_path / "hf").eval()
    diff = (_logits(kind, model) - _logits(kind, hf, hf=True)).abs().max().item()
    print(f"\nexport {kind}: max |logit difference| {diff:.1e}")  # pytest -s shows the measured figure
    assert diff <= 1e-4, (kind, diff)


def _hf_saved(kind: str, folder: Path, seed: int = 3):
    """A random transformers model of the family, saved with save_pretrained (its own file layout)."""
    torch.manual_seed(seed)
    spec = dict(FAMILIES[kind][2])
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), vocab_size=VOCAB, **spec)
    hf = _hf_class(kind).from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_import_from_transformers_gives_the_same_logits(tmp_path, kind):
    hf = _hf_saved(kind, tmp_path / "hf")
    cfg = _config(kind, f"model.init_from={tmp_path / 'hf'}")
    model = build_model(cfg.model, VOCAB, "cpu", seed=0).eval()
    reader = init_source(cfg.model, VOCAB)
    StateAdapter(ShardedState(model, {}, torch.optim.AdamW(model.parameters()))).restore(reader, 0.0)
    diff = (_logits(kind, model) - _logits(kind, hf, hf=True)).abs().max().item()
    print(f"\nimport {kind}: max |logit difference| {diff:.1e}")  # pytest -s shows the measured figure
    assert diff <= 1e-4, (kind, diff)


@pytest.mark.launches
@pytest.mark.parametrize("kind,ranks,layout,launcher", [
    ("llama", 2, ["parallel.tensor=2"], "torchrun"),
    ("t5", 2, ["parallel.zero_stage=3"], "deepspeed"),
    ("bert", 2, ["parallel.pipeline=2"], "torchrun"),
], ids=["llama-tp2", "t5-zero3", "bert-pp2"])
def test_fine_tune_from_transformers_under_a_layout(tmp_path, kind, ranks, layout, launcher):
    """Each rank reads its shard of the transformers weights. With a learning rate of 1e-30 (no change in fp32)
    the run's checkpoint, exported back, is the transformers model again (logits within 1e-5)."""
    hf = _hf_saved(kind, tmp_path / "hf")
    family, options, _ = FAMILIES[kind]
    run_dir = tmp_path / "run"
    out = launch_ok(ranks, tiny_overrides(run_dir, family, *options, f"model.init_from={tmp_path / 'hf'}",
                                          "train.steps=2", "optim.lr=1e-30", "schedule.name=constant",
                                          "schedule.warmup_steps=0", "train.micro_batch_size=2", *layout),
                    launcher=launcher)
    assert "model.init_from" in out
    proc = _export(run_dir, tmp_path / "back")
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = _hf_class(kind).from_pretrained(tmp_path / "back").eval()
    diff = (_logits(kind, back, hf=True) - _logits(kind, hf, hf=True)).abs().max().item()
    assert diff <= 1e-5, (kind, diff)


@pytest.mark.launches
def test_init_from_a_bigtrain_checkpoint_under_another_layout(tmp_path):
    """Weights only, from a one-device run's checkpoint into a ZeRO-1 data-parallel run (each rank's fp32
    master partition set, fresh optimizer, step 0): with a learning rate of 1e-30 (no change in fp32) its
    weights stay the first run's, bitwise."""
    first, second = tmp_path / "first", tmp_path / "second"
    single_process(tiny_overrides(first, "causal", "train.steps=4"))
    launch_ok(2, tiny_overrides(second, "causal", f"model.init_from={first}", "train.steps=2", "optim.lr=1e-30",
                                "schedule.name=constant", "schedule.warmup_steps=0", "parallel.zero_stage=1",
                                "train.micro_batch_size=2"), launcher="deepspeed")
    (_, before), (_, after) = load_weights(first), load_weights(second)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    metrics = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][0] == 1  # a new run: step counting starts again


def test_init_from_mismatch_names_the_keys(tmp_path):
    _hf_saved("gpt2", tmp_path / "hf")
    cfg = _config("gpt2", f"model.init_from={tmp_path / 'hf'}", "model.d_model=64", "model.activation=gelu")
    with pytest.raises(ConfigError) as info:
        init_source(cfg.model, VOCAB)
    message = str(info.value)
    assert "model.d_model=64 here, 32 there" in message and "model.activation='gelu' here, 'gelu_tanh'" in message
    assert "Set model.d_model=32 model.activation=gelu_tanh" in message
    with pytest.raises(ConfigError, match="model.init_from=.*: no such folder"):
        init_source(_config("gpt2", f"model.init_from={tmp_path / 'missing'}").model, VOCAB)
    with pytest.raises(ConfigError, match="model.vocab_size=384 here, 320 there. Set model.vocab_size=320"):
        init_source(_config("gpt2", f"model.init_from={tmp_path / 'hf'}").model, 384)


@pytest.mark.parametrize("extra,named", [
    (["model.family=causal", "model.positions=sinusoidal"], "model.positions=sinusoidal"),
    (["model.family=causal", *GPT2_OPTIONS, "model.norm=rmsnorm"], "model.norm='rmsnorm'"),
    (["model.family=seq2seq", *T5_OPTIONS, "model.scale_attention=true"], "model.scale_attention=True"),
    (["model.family=masked", *BERT_OPTIONS, "model.head_transform=false"], "model.head_transform=False"),
], ids=["sinusoidal", "gpt2-rmsnorm", "t5-scaled", "bert-no-transform"])
def test_export_refuses_options_without_counterpart(tmp_path, extra, named):
    cfg = load_config(None, [*TINY_MODEL, "data.seq_len=32", *extra])
    proc = _export(_bigtrain_folder(cfg, _perturbed(cfg), tmp_path / "bigtrain"), tmp_path / "hf")
    assert proc.returncode != 0 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_export_writes_the_runs_tokenizer(tmp_path):
    """A run with a tokenizer.json: the exported folder has it (with the special tokens bigtrain added), and
    config.json names their ids."""
    from tests.test_data import _tiny_hf_tokenizer

    tokenizer = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    cfg = _config("gpt2", f"data.tokenizer={tokenizer}")
    proc = _export(_bigtrain_folder(cfg, _perturbed(cfg), tmp_path / "bigtrain"), tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert fast.decode(fast.encode("the lazy fox")) == "the lazy fox"
    assert fast.convert_ids_to_tokens(config["pad_token_id"]) == "[PAD]"
    assert {config["bos_token_id"], config["eos_token_id"]} <= set(fast.get_vocab().values())


def _strip(row: list[int], eos: int, pad: int) -> list[int]:
    """New tokens up to and including the first EOS (transformers pads finished rows)."""
    out = []
    for token in row:
        out.append(token)
        if token == eos:
            break
    while out and out[-1] == pad and eos != pad:
        out.pop()
    return out


@pytest.fixture(scope="module")
def generation_export(tmp_path_factory):
    """kind -> (the perturbed bigtrain model, transformers' load of its `bigtrain export --format hf` folder): one
    export per family, shared by greedy and beam search (generation changes neither model)."""
    made = {}

    def get(kind: str):
        if kind not in made:
            cfg, folder = _config(kind), tmp_path_factory.mktemp(f"generate-{kind}")
            model = _perturbed(cfg, seed=5)
            proc = _export(_bigtrain_folder(cfg, model, folder / "bigtrain"), folder / "hf")
            assert proc.returncode == 0, proc.stderr[-2000:]
            made[kind] = model, _hf_class(kind).from_pretrained(folder / "hf").eval()
        return made[kind]

    return get


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("beams,length_penalty", [(1, 1.0), (4, 0.7)], ids=["greedy", "beams4"])
def test_generation_equals_transformers_generate_on_the_export(generation_export, kind, beams, length_penalty):
    """Greedy and 4-beam search (length penalty 0.7) with bigtrain's KV cache pick the tokens transformers'
    `generate` picks on the exported folder, for a batch of two prompts (left-padded for causal models)."""
    from bigtrain.data.tokenizer import ByteTokenizer
    from bigtrain.inference.generate import Decoding, generate

    tok = ByteTokenizer()
    model, hf = generation_export(kind)
    prompts = [tok.encode("The quick brown fox"), tok.encode("Hi")]
    decoding = Decoding(beams=beams, length_penalty=length_penalty) if beams > 1 else Decoding(greedy=True)
    ours = generate(model, prompts, 12, decoding, eos_id=tok.eos_id, pad_id=tok.pad_id, bos_id=tok.bos_id,
                    vocab_limit=None)
    width = max(len(p) for p in prompts)
    if kind == "t5":  # sources right-padded; the decoder starts from bos (config.json's decoder_start_token_id)
        ids = torch.tensor([p + [tok.pad_id] * (width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    else:
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=beams,
                          length_penalty=length_penalty, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    start = 1 if kind == "t5" else width
    theirs = [_strip(row[start:].tolist(), tok.eos_id, tok.pad_id) for row in out]
    assert ours == theirs
