"""The shipped presets, the frozen set of config keys, overrides, and the errors a bad config gets.

Every `configs/*.yaml` is picked up automatically: it must load, validate and build on the meta device
(shapes only, no memory), so even the 175B preset is checked in milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from bigtrain.config import Config, dump_config, load_config, parse_overrides
from bigtrain.config.loader import config_from_dict
from bigtrain.config.schema import key_name
from bigtrain.errors import ConfigError
from bigtrain.models.build import build_model, count_parameters
from bigtrain.parallel.validate import load_run_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(CONFIG_DIR.glob("*.yaml"))
BYTE_VOCAB = 320  # the byte tokenizer's 260 ids rounded up to model.vocab_multiple (64)


def _vocab(cfg: Config) -> int:
    return cfg.model.vocab_size or BYTE_VOCAB


@functools.cache
def _built(name: str) -> tuple[Config, torch.nn.Module]:
    """The preset's config and its model on the meta device (built once per test session)."""
    cfg, _ = load_run_config(CONFIG_DIR / f"{name}.yaml")
    return cfg, build_model(cfg.model, _vocab(cfg), "meta")


def _n_params(name: str) -> int:
    return count_parameters(_built(name)[1])


# --- presets -------------------------------------------------------------------------------------------


def test_expected_presets_ship() -> None:
    names = {p.stem for p in PRESETS}
    expected = {"smoke", "transformer-base", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl",
                "gpt3-1.3b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b", "bert-base", "t5-base"}
    assert expected <= names, f"missing presets: {sorted(expected - names)}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_builds_on_meta(path: Path) -> None:
    cfg, model = _built(path.stem)
    assert model.family == cfg.model.family
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    if cfg.model.tie_embeddings:
        assert model.head.weight is model.embed.tokens.weight
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    # Valid as shipped for one device: the layout is chosen on the command line.
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage) == (1, 1, 0)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_sets_only_schema_keys_and_is_commented(path: Path) -> None:
    text = path.read_text()
    assert text.lstrip().startswith("#"), f"{path.name} should open with a comment describing the preset"
    data = yaml.safe_load(text)
    sections = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
    for section, values in data.items():
        assert section in sections, f"{path.name}: unknown section {section}"
        known = {key_name(f) for f in dataclasses.fields(sections[section])}
        assert set(values) <= known, f"{path.name}: unknown keys {sorted(set(values) - known)} in {section}"


def test_presets_write_to_distinct_run_dirs() -> None:
    dirs = [load_config(p).run.dir for p in PRESETS]
    assert len(set(dirs)) == len(dirs), "two presets would resume each other's checkpoints"


@pytest.mark.parametrize(("name", "published", "tolerance"), [
    ("gpt2-small", 124e6, 0.02),
    ("gpt2-medium", 355e6, 0.02),
    ("gpt2-large", 774e6, 0.02),
    ("gpt2-xl", 1558e6, 0.02),
    ("gpt3-1.3b", 1.3e9, 0.10),
    ("gpt3-6.7b", 6.7e9, 0.05),
    ("gpt3-13b", 13e9, 0.05),
    ("gpt3-175b", 175e9, 0.05),
    ("transformer-base", 65e6, 0.05),
    ("bert-base", 110e6, 0.05),
    ("t5-base", 220e6, 0.05),
])
def test_preset_parameter_count_matches_published(name: str, published: float, tolerance: float) -> None:
    n = _n_params(name)
    assert abs(n - published) <= tolerance * published, f"{name}: {n:,} parameters vs published {published:,.0f}"


def test_smoke_preset_is_small_and_self_contained() -> None:
    cfg = load_config(CONFIG_DIR / "smoke.yaml")
    assert (cfg.data.source, cfg.data.tokenizer, cfg.model.family) == ("embedded", "byte", "causal")
    assert cfg.model.vocab_size is None
    assert _n_params("smoke") < 5e6


# --- the frozen key set --------------------------------------------------------------------------------


def _dotted_keys(obj: Any, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        full = f"{prefix}{key_name(f)}"
        keys |= _dotted_keys(value, full + ".") if dataclasses.is_dataclass(value) else {full}
    return keys


EXPECTED_KEYS = {
    "model.family", "model.vocab_size", "model.vocab_multiple", "model.d_model", "model.n_layers",
    "model.n_decoder_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff", "model.max_seq_len",
    "model.positions", "model.rope_theta", "model.norm_position", "model.norm", "model.norm_eps",
    "model.activation", "model.scale_embeddings", "model.tie_embeddings", "model.bias", "model.dropout",
    "model.attention_dropout", "model.init", "model.init_std", "model.relative_buckets",
    "model.relative_max_distance", "model.scale_attention", "model.embedding_norm", "model.type_vocab_size",
    "model.head_transform", "model.head_bias", "model.scale_tied_output", "model.init_from",
    "model.moe.experts", "model.moe.top_k", "model.moe.every", "model.moe.shared_experts", "model.moe.d_ff",
    "model.moe.aux_loss_coef", "model.moe.z_loss_coef", "model.moe.capacity_factor",
    "parallel.tensor", "parallel.sequence_parallel", "parallel.context", "parallel.context_attention",
    "parallel.pipeline",
    "parallel.partition_method", "parallel.pipeline_schedule", "parallel.virtual_stages", "parallel.micro_batches",
    "parallel.data", "parallel.expert", "parallel.zero_stage",
    "parallel.activation_checkpointing", "parallel.checkpoint_every_n_layers", "parallel.offload_optimizer",
    "parallel.engine", "parallel.collective_timeout",
    "optim.name", "optim.lr", "optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay",
    "optim.grad_clip", "optim.lamb_max_trust_ratio",
    "schedule.name", "schedule.warmup_steps", "schedule.min_lr_ratio", "schedule.decay_fraction",
    "schedule.noam_scale",
    "data.source", "data.format", "data.text_field", "data.source_field", "data.target_field", "data.tokenizer",
    "data.seq_len", "data.max_bytes", "data.holdout_fraction", "data.mask_prob", "data.task_samples",
    "data.task_min_len", "data.task_max_len", "data.cache_dir", "data.bucket_size", "data.encoding_errors",
    "data.document_masking", "data.sources", "data.verify_shards",
    "train.steps", "train.seed", "train.global_batch_size", "train.micro_batch_size", "train.precision",
    "train.device", "train.eval_every", "train.eval_samples", "train.eval_batches", "train.early_stop_patience",
    "train.on_nonfinite",
    "train.sample_tokens", "train.sample_prompt", "train.threads", "train.compile", "train.fp8_recipe",
    "train.fp8_check_every", "train.fp8_tolerance", "train.max_skipped_steps",
    "train.hang_timeout",
    "checkpoint.every", "checkpoint.keep", "checkpoint.resume", "checkpoint.layout_free_every", "checkpoint.async",
    "log.every", "log.tensorboard", "log.progress", "log.peak_tflops", "log.attention_images", "log.verbose",
    "log.mlflow.experiment", "log.mlflow.tracking_uri", "log.wandb.project", "log.wandb.mode",
    "run.dir",
    "deepspeed",
}


def test_config_keys_are_frozen() -> None:
    keys = _dotted_keys(Config())
    added, removed = sorted(keys - EXPECTED_KEYS), sorted(EXPECTED_KEYS - keys)
    assert not added and not removed, (
        f"config keys changed (added {added}, removed {removed}); update EXPECTED_KEYS deliberately, "
        f"and the docs, when the schema grows")


def test_every_key_has_help_text() -> None:
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if not dataclasses.is_dataclass(value):  # the free-form deepspeed: passthrough
            assert section.metadata.get("help"), f"{section.name} has no help text"
            continue
        for f in dataclasses.fields(value):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"


# --- overrides and coercion ----------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_overrides_apply() -> None:
    cfg = load_config(CONFIG_DIR / "smoke.yaml", ["train.steps=50", "model.dropout=0.2", "optim.name=lamb",
                                                  "run.dir=runs/x", "model.vocab_size=512", "log.tensorboard=false"])
    assert (cfg.train.steps, cfg.model.dropout, cfg.optim.name) == (50, 0.2, "lamb")
    assert (cfg.run.dir, cfg.model.vocab_size, cfg.log.tensorboard) == ("runs/x", 512, False)
    # Everything not overridden keeps the file's values.
    smoke = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    assert (cfg.model.d_model, cfg.optim.lr, cfg.schedule.warmup_steps) == (
        smoke["model"]["d_model"], smoke["optim"]["lr"], smoke["schedule"]["warmup_steps"])


def test_override_null_and_nested_dict() -> None:
    assert parse_overrides(["a.b=1", "a.c=x", "d.e=null"]) == {"a": {"b": 1, "c": "x"}, "d": {"e": None}}
    cfg = load_config(CONFIG_DIR / "gpt2-small.yaml", ["model.vocab_size=null"])
    assert cfg.model.vocab_size is None


def test_int_becomes_float_and_integral_float_becomes_int() -> None:
    cfg = load_config(None, ["optim.lr=1", "log.peak_tflops=989", "train.steps=50.0"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.log.peak_tflops == 989.0 and isinstance(cfg.log.peak_tflops, float)  # float | None
    assert cfg.train.steps == 50 and isinstance(cfg.train.steps, int)


def test_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `1e-3` as a string; the loader accepts it where a number is due.
    cfg = load_config(None, ["optim.lr=1e-3", "optim.eps=1E-9", "train.steps=2e3"])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.train.steps) == (1e-3, 1e-9, 2000)
    assert isinstance(cfg.train.steps, int)
    cfg = load_config(_write(tmp_path, "optim:\n  lr: 3e-4\n  eps: 1.0e-8\nlog:\n  peak_tflops: 9.89e2\n"))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.log.peak_tflops) == (3e-4, 1e-8, 989.0)
    # Strings stay strings where strings are due.
    assert load_config(None, ["train.sample_prompt=1e3"]).train.sample_prompt == "1e3"


def test_order_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  steps: 300\n  seed: 7\n")
    assert load_config(None).train.steps == Config().train.steps
    cfg = load_config(path)
    assert (cfg.train.steps, cfg.train.seed) == (300, 7)
    cfg = load_config(path, ["train.steps=50"])
    assert (cfg.train.steps, cfg.train.seed) == (50, 7)
    assert load_config(path, ["train.steps=50", "train.steps=60"]).train.steps == 60  # left to right


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "# nothing\n")) == Config()


# --- bad configs: one clear paragraph naming the key and what is allowed --------------------------------

# (id, how to load, match): "how" is a list of overrides, or a dict with `yaml` (file text), `path`
# (a file that does not exist) and/or `world_size`.
BAD: list[tuple[str, Any, str]] = [
    ("unknown-section", ["modle.d_model=256"],
     r"Unknown config key 'modle' in the top level\. Did you mean 'model'\? Valid keys: checkpoint, data"),
    ("unknown-key", ["train.step=5"],
     r"Unknown config key 'train\.step' in section 'train'\. Did you mean 'steps'\? Valid keys: .*seed"),
    ("unknown-key-in-file", {"yaml": "model:\n  d_modle: 64\n"},
     r"'model\.d_modle'.*Did you mean 'd_model'\?"),
    ("wrong-type", ["train.steps=abc"],
     r"Config key 'train\.steps' must be int, got 'abc' \(str\)\. .*train\.steps=VALUE"),
    ("fractional-int", ["train.steps=2.5"], r"Config key 'train\.steps' must be int, got 2\.5"),
    ("bool-as-int", ["model.tie_embeddings=1"], r"Config key 'model\.tie_embeddings' must be bool, got 1 \(int\)"),
    ("int-as-bool", ["train.steps=true"], r"Config key 'train\.steps' must be int, got True \(bool\)"),
    ("optional-wrong-type", ["model.vocab_size=big"], r"'model\.vocab_size' must be int or null, got 'big'"),
    ("literal", ["optim.name=sgd"],
     r"Config key 'optim\.name' has value 'sgd', which is not allowed\. Allowed values: 'adamw', 'lamb'\."),
    ("literal-typo", ["schedule.name=cosin"],
     r"'schedule\.name' has value 'cosin'.*Did you mean 'cosine'\? Allowed values: 'noam', 'cosine'"),
    ("heads-divide-d-model", ["model.n_heads=7"],
     r"model\.d_model=512 is not divisible by model\.n_heads=7.*divisors of 512"),
    ("kv-heads-divide-heads", ["model.n_kv_heads=3"], r"model\.n_heads=8 is not divisible by model\.n_kv_heads=3"),
    ("rotary-odd-head", ["model.positions=rotary", "model.d_model=48", "model.n_heads=16"],
     r"model\.positions='rotary' needs an even head size.*48 / n_heads 16 = 3"),
    ("batch-divisible", ["train.global_batch_size=32", "train.micro_batch_size=5"],
     r"train\.global_batch_size=32 is not divisible by train\.micro_batch_size=5.*multiple of 5"),
    ("seq-len-over-max", ["data.seq_len=1024", "model.max_seq_len=512"],
     r"data\.seq_len=1024 exceeds model\.max_seq_len=512.*Lower data\.seq_len or raise model\.max_seq_len"),
    ("negative-lr", ["optim.lr=-3e-4"], r"Config key 'optim\.lr' must be positive, got -0\.0003"),
    ("dropout-one", ["model.dropout=1.0"], r"Config key 'model\.dropout' must lie in \[0, 1\), got 1\.0"),
    ("beta2-one", ["optim.beta2=1"], r"Config key 'optim\.beta2' must lie in \[0, 1\), got 1\.0"),
    ("noam-no-warmup", ["schedule.name=noam", "schedule.warmup_steps=0"],
     r"schedule\.name='noam' divides by schedule\.warmup_steps; set it > 0"),
    ("zero-stage", ["parallel.zero_stage=5"], r"parallel\.zero_stage must be 0, 1, 2 or 3, got 5"),
    ("tensor-over-world", ["parallel.tensor=2"],
     r"parallel\.tensor \(2\) \* parallel\.pipeline \(1\) = 2 does not divide the world size 1"),
    ("pipeline-zero2", {"overrides": ["parallel.pipeline=2", "parallel.zero_stage=2"], "world_size": 2},
     r"parallel\.zero_stage=2 with parallel\.pipeline=2 is refused: DeepSpeed's pipeline engine supports ZeRO "
     r"stages 0 and 1 only.*Use parallel\.zero_stage=1, or parallel\.engine=torch"),
    ("pipeline-empty-stage", {"overrides": ["parallel.pipeline=8", "model.n_layers=2"], "world_size": 8},
     r"parallel\.pipeline=8 with parallel\.partition_method='parameters' leaves a stage without layers "
     r"\(layers per stage: \[1, 1, 1, 1, 1, 0, 0, 0\]; the model has 5 pipeline layers"),
    ("pipeline-partition-unknown", {"overrides": ["parallel.pipeline=2", "parallel.partition_method=random"],
                                    "world_size": 2},
     r"parallel\.partition_method='random' is not known; use 'parameters', 'uniform' or 'type:"),
    ("micro-batches-mismatch", ["parallel.micro_batches=3"],
     r"parallel\.micro_batches=3 but train\.global_batch_size=32 / \(train\.micro_batch_size=32 \* data-parallel "
     r"size 1\) = 1 micro-batches per step"),
    ("heads-over-tensor", {"overrides": ["parallel.tensor=5", "model.d_model=48", "model.n_heads=12",
                                         "model.d_ff=160", "model.vocab_size=320"], "world_size": 5},
     r"does not split over parallel\.tensor=5 ranks: model\.n_heads=12 is not divisible by parallel\.tensor=5\. "),
    ("kv-heads-over-tensor", {"overrides": ["parallel.tensor=4", "model.n_kv_heads=2"], "world_size": 4},
     r"model\.n_kv_heads=2 is not divisible by parallel\.tensor=4"),
    ("ffn-over-tensor", {"overrides": ["parallel.tensor=3", "model.n_heads=6", "model.d_model=384", "model.d_ff=2000",
                                       "model.vocab_multiple=96"], "world_size": 3},
     r"model\.d_ff=2000 is not divisible by parallel\.tensor=3\. "),
    ("vocab-over-tensor", {"overrides": ["parallel.tensor=2", "model.vocab_size=301"], "world_size": 2},
     r"the vocabulary of 301 ids is not divisible by parallel\.tensor=2"),
    ("vocab-multiple-over-tensor", {"overrides": ["parallel.tensor=2", "model.vocab_multiple=5"], "world_size": 2},
     r"model\.vocab_multiple=5 .* is not divisible by parallel\.tensor=2"),
    ("tensor-before-world", {"overrides": ["parallel.tensor=5", "model.n_heads=12", "model.d_model=48"]},
     r"model\.n_heads=12 is not divisible by parallel\.tensor=5"),
    ("sequence-parallel-no-tensor", ["parallel.sequence_parallel=true"],
     r"parallel\.sequence_parallel=true .* but parallel\.tensor=1"),
    ("decoder-layers-causal", ["model.n_decoder_layers=6"],
     r"model\.n_decoder_layers is only used by model\.family='seq2seq'"),
    ("task-needs-seq2seq", ["data.source=reverse"],
     r"data\.source='reverse' is a generated seq2seq task; it needs model\.family='seq2seq' \(got 'causal'\)"),
    ("attention-images-tensor", {"overrides": ["log.attention_images=true", "parallel.tensor=2"], "world_size": 2},
     r"log\.attention_images=true with parallel\.tensor=2 and parallel\.pipeline=1 is refused: .*Use "
     r"parallel\.tensor=1 and parallel\.pipeline=1 \(data parallelism and ZeRO work\), or .*bigtrain attention"),
    ("attention-images-pipeline", {"overrides": ["log.attention_images=true", "parallel.pipeline=2"],
                                   "world_size": 2},
     r"log\.attention_images=true with parallel\.tensor=1 and parallel\.pipeline=2 is refused"),
    ("attention-images-no-tensorboard", ["log.attention_images=true", "log.tensorboard=false"],
     r"log\.attention_images=true draws into TensorBoard or an experiment tracker, but log\.tensorboard=false"),
    ("override-without-equals", ["train.steps"],
     r"Override 'train\.steps' is not of the form section\.key=value \(for example train\.steps=50\)"),
    ("override-empty-key", ["train..steps=5"], r"Override 'train\.\.steps=5' has an empty key"),
    ("section-not-mapping", ["model=5"], r"Config section 'model' must be a mapping of keys to values, got 5"),
    ("missing-file", {"path": "no-such-config.yaml"},
     r"Config file '.*no-such-config\.yaml' does not exist\. Pass an existing YAML file to --config"),
    ("file-not-mapping", {"yaml": "- model\n- train\n"},
     r"Config file '.*' must hold a mapping of sections \(model:, train:, \.\.\.\), got list"),
    ("file-bad-syntax", {"yaml": "model:\n  d_model: [512\ntrain:\n  steps: 5\n"},
     r"Config file '.*' is not valid YAML at line \d+, column \d+: .*Fix the syntax"),
]


@pytest.mark.parametrize(("how", "match"), [pytest.param(h, m, id=i) for i, h, m in BAD])
def test_bad_config_is_one_clear_paragraph(how: Any, match: str, tmp_path: Path) -> None:
    spec = {"overrides": how} if isinstance(how, list) else how
    path = None
    if "yaml" in spec:
        path = _write(tmp_path, spec["yaml"])
    elif "path" in spec:
        path = tmp_path / spec["path"]
    with pytest.raises(ConfigError, match=match) as info:  # what a command runs before it starts work
        load_run_config(path, spec.get("overrides"), world_size=spec.get("world_size", 1))
    message = str(info.value)
    assert "\n" not in message, message
    assert message.endswith((".", "?")), message


def test_bad_cases_are_distinct() -> None:
    ids = [case[0] for case in BAD]
    assert len(set(ids)) == len(ids) >= 12


# --- dump / load round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, *PRESETS], ids=lambda p: "defaults" if p is None else p.stem)
def test_dump_config_round_trip(path: Path | None, tmp_path: Path) -> None:
    cfg = load_config(path)
    text = dump_config(cfg)
    assert config_from_dict(yaml.safe_load(text)) == cfg
    # The dump is itself a loadable config file (what run.dir/config.yaml holds).
    assert load_config(_write(tmp_path, text, "config.yaml")) == cfg


# --- tensor-parallel plans of the presets ----------------------------------------------------------------
@pytest.mark.parametrize("name,tensor", [("gpt3-6.7b", 8), ("gpt3-175b", 8), ("t5-base", 4), ("bert-base", 2)])
def test_preset_splits_over_tensor_ranks(name: str, tensor: int) -> None:
    """The preset's model split `tensor` ways on the meta device: each rank holds 1/tensor of every split
    parameter, replicated ones (norms, biases of row-parallel layers, positions) whole."""
    from bigtrain.parallel.tensor import apply_tensor_parallel
    from bigtrain.parallel.tensor_layers import TensorParallel

    cfg, full = _built(name)
    split = build_model(cfg.model, _vocab(cfg), "meta")
    plan = apply_tensor_parallel(split, TensorParallel(group=None, rank=0, size=tensor))
    full_params = dict(full.named_parameters())
    for pname, p in split.named_parameters():
        expected = plan[pname].full_shape(p.shape) if pname in plan else p.shape
        assert tuple(expected) == tuple(full_params[pname].shape), pname
    sharded = sum(p.numel() for n, p in split.named_parameters() if n in plan)
    replicated = count_parameters(split) - sharded
    assert sharded * tensor + replicated == _n_params(name)
    assert replicated < 0.01 * _n_params(name)  # almost everything is split


def test_gpt3_175b_pipeline_partition() -> None:
    """GPT-3 175B cut into 16 stages by parameters (DeepSpeed's balance, on the meta model): no stage is
    empty, and every stage holds 5 or 6 of the 96 blocks (the embedding and head weigh about one block)."""
    from bigtrain.parallel.pipeline import BlockPipe, layer_specs
    from bigtrain.parallel.pipeline_module import check_stages

    cfg, model = _built("gpt3-175b")
    specs = layer_specs(model, lambda piece: None)
    bounds = check_stages(specs, 16, "parameters")
    blocks = [sum(1 for s in specs[a:b] if getattr(s, "typename", None) is BlockPipe)
              for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert sum(blocks) == 96 and min(blocks) >= 5 and max(blocks) <= 6, blocks
