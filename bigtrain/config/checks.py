"""Cross-field rules of the configuration, checked at load time.

Each failed rule raises `ConfigError` naming the key(s), the value(s) and what is allowed. These rules read
the config alone (arithmetic on its values): nothing here imports torch, the models or DeepSpeed. Rules that
need a built model or an engine's derived settings (pipeline stages, the DeepSpeed passthrough) run after
loading, in the layer that owns them (`bigtrain.engine.validate.validate_run`).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import Any

from bigtrain.config.layout import Layout
from bigtrain.config.schema import Config, ModelConfig
from bigtrain.errors import ConfigError

# Integers go to torch, NumPy and C APIs as signed 64-bit values; a few keys have a narrower range.
INT64 = (-(2**63), 2**63, "be an integer in [-2**63, 2**63) (64 bits)")
INT_RANGES: dict[str, tuple[int, int, str]] = {
    "train.seed": (0, 2**32, "lie in [0, 2**32) = [0, 4294967295] (the seed of every random generator)"),
}
# Every float key must be finite; where infinity would mean something, the message names the finite way to say it.
FINITE_HINTS: dict[str, str] = {
    "train.hang_timeout": " train.hang_timeout=0 turns the watchdog off.",
    "parallel.collective_timeout": " Collectives cannot wait forever; give a number of seconds.",
    "optim.grad_clip": " optim.grad_clip=0 disables clipping.",
    "optim.lamb_max_trust_ratio": " optim.lamb_max_trust_ratio=null leaves the trust ratio unbounded.",
    "log.peak_tflops": " log.peak_tflops=null looks the peak up for known GPUs.",
}
MAX_TIMEOUT = 1e9  # seconds (about 31 years); timedelta, thread waits and NCCL refuse much larger values
PATH_KEYS = ("data.source", "data.tokenizer", "data.cache_dir", "run.dir")


class _Short(reprlib.Repr):
    """reprlib with short limits and integers too long for `repr` (over 4300 digits) described by size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 6, 6, 6
        self.maxstring, self.maxother, self.maxlong = 80, 80, 60

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() <= 1000:
            return super().repr_int(x, level)
        digits = int(x.bit_length() * math.log10(2))
        digits += abs(x) >= 10**digits
        return f"{'a negative' if x < 0 else 'an'} integer of {digits} digits"


_SHORT = _Short()


def show(value: Any) -> str:
    """A short one-line repr of a config value for messages (bounded for huge, deep or self-referencing values)."""
    return _SHORT.repr(value)


def show_key(key: Any, limit: int = 80) -> str:
    """A key (or path) as written, with control characters escaped and, beyond `limit` characters, shortened
    (to quote in a message)."""
    text = key if isinstance(key, str) else show(key)
    if len(text) > limit:
        text = f"{text[:limit * 5 // 8]}...{text[-(limit // 4):]}"
    return repr(text)[1:-1]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(name: str, value: int | float) -> None:
    _require(value > 0, f"Config key '{name}' must be positive, got {value}.")


def _fraction(name: str, value: float, low_open: bool = False, high_open: bool = True) -> None:
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    _require(lo_ok and hi_ok, f"Config key '{name}' must lie in {lo}0, 1{hi}, got {value}.")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """World size divided by the model-parallel sizes (tensor * pipeline)."""
    p = cfg.parallel
    return Layout.for_world(p.tensor, p.pipeline, world_size, p.data).data


def tensor_split_problems(cfg: ModelConfig, vocab_size: int | None, tensor: int) -> list[str]:
    """Problems that stop a model from splitting over `tensor` ranks, each naming both numbers."""
    problems = []
    sizes = [("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads), ("model.d_ff", cfg.d_ff)]
    for key, value in sizes:
        if value is not None and value % tensor:
            problems.append(f"{key}={value} is not divisible by parallel.tensor={tensor}")
    if vocab_size is not None and vocab_size % tensor:
        padded = -(-vocab_size // tensor) * tensor
        problems.append(f"the vocabulary of {vocab_size} ids is not divisible by parallel.tensor={tensor} (pad it "
                        f"with model.vocab_size={padded})")
    return problems


def check_tensor_parallel(cfg: Config) -> None:
    """The model must split evenly over parallel.tensor ranks; checked before the world size matters."""
    p, m = cfg.parallel, cfg.model
    if p.tensor == 1:
        _require(not p.sequence_parallel, "parallel.sequence_parallel=true cuts the sequence over the tensor-"
                 "parallel ranks, but parallel.tensor=1. Set parallel.tensor > 1 or sequence_parallel=false.")
        return
    problems = tensor_split_problems(m, m.vocab_size, p.tensor)
    if m.vocab_size is None and m.vocab_multiple % p.tensor:
        problems.append(f"model.vocab_multiple={m.vocab_multiple} (the automatic vocabulary size is a multiple "
                        f"of it) is not divisible by parallel.tensor={p.tensor}")
    _require(not problems, f"The model does not split over parallel.tensor={p.tensor} ranks: "
             f"{'; '.join(problems)}. Choose a tensor size that divides each of them (or change the model).")
    if p.sequence_parallel:
        longest = -(-cfg.data.seq_len // p.tensor) * p.tensor
        _require(longest <= m.max_seq_len,
                 f"parallel.sequence_parallel pads sequences to a multiple of parallel.tensor={p.tensor}: "
                 f"data.seq_len={cfg.data.seq_len} becomes {longest} > model.max_seq_len={m.max_seq_len}. "
                 f"Raise model.max_seq_len to {longest} or pick a data.seq_len divisible by {p.tensor}.")


def check_numbers(cfg: Config) -> None:
    """Every integer key fits its range (64 bits unless narrower), every float key is finite."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            key, value = f"{section.name}.{f.name}", getattr(values, f.name)
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int):
                low, high, allowed = INT_RANGES.get(key, INT64)
                _require(low <= value < high, f"Config key '{key}' must {allowed}, got {show(value)}.")
            elif isinstance(value, float):
                _require(math.isfinite(value), f"Config key '{key}' must be a finite number, got {value}."
                         f"{FINITE_HINTS.get(key, '')}")


def check_paths(cfg: Config) -> None:
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(isinstance(value, str) and value != "" and "\x00" not in value,
                 f"Config key '{key}' must be a non-empty path without NUL characters, got {show(value)}.")


def _timeout(name: str, value: float) -> None:
    _require(value <= MAX_TIMEOUT, f"Config key '{name}' must be at most {MAX_TIMEOUT:g} seconds (about 31 years), "
             f"got {value}.")


def check_model(cfg: Config) -> None:
    m = cfg.model
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "vocab_multiple"):
        _positive(f"model.{name}", getattr(m, name))
    if m.vocab_size is not None:
        _positive("model.vocab_size", m.vocab_size)
    if m.n_decoder_layers is not None:
        _positive("model.n_decoder_layers", m.n_decoder_layers)
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; each head gets "
             f"d_model / n_heads dimensions. Pick n_heads from the divisors of {m.d_model}.")
    if m.n_kv_heads is not None:
        _positive("model.n_kv_heads", m.n_kv_heads)
        _require(m.n_heads % m.n_kv_heads == 0,
                 f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
                 f"grouped-query attention shares each key/value head among n_heads / n_kv_heads heads.")
    head_dim = m.d_model // m.n_heads
    if m.positions == "rotary":
        _require(head_dim % 2 == 0, f"model.positions='rotary' needs an even head size, but d_model "
                 f"{m.d_model} / n_heads {m.n_heads} = {head_dim}.")
    if m.positions == "sinusoidal":
        _require(m.d_model % 2 == 0, f"model.positions='sinusoidal' needs an even model.d_model, "
                 f"got {m.d_model}.")
    if m.positions == "relative":
        _require(m.relative_buckets >= 4, f"model.relative_buckets={m.relative_buckets}: relative positions need "
                 f"at least 4 buckets (T5 uses 32).")
        _require(m.relative_max_distance > m.relative_buckets // 2,
                 f"model.relative_max_distance={m.relative_max_distance} must exceed half of "
                 f"model.relative_buckets={m.relative_buckets} (the exact buckets); T5 uses 128 with 32 buckets.")
    _require(m.type_vocab_size >= 0, f"model.type_vocab_size must be 0 (no token types) or more, "
             f"got {m.type_vocab_size}.")
    _require(not m.scale_tied_output or m.tie_embeddings,
             "model.scale_tied_output=true rescales the input of a tied output head (T5), but "
             "model.tie_embeddings=false. Set model.tie_embeddings=true or model.scale_tied_output=false.")
    _require(not m.head_transform or m.activation != "swiglu",
             "model.head_transform=true applies model.activation to one dense layer, which swiglu (a gated pair) "
             "cannot be. Use model.activation=gelu (BERT) or model.head_transform=false.")
    _fraction("model.dropout", m.dropout)
    if m.attention_dropout is not None:
        _fraction("model.attention_dropout", m.attention_dropout)
    _positive("model.init_std", m.init_std)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.rope_theta", m.rope_theta)
    if m.family != "seq2seq":
        _require(m.n_decoder_layers is None, f"model.n_decoder_layers is only used by "
                 f"model.family='seq2seq'; remove it for family '{m.family}'.")


def uses_deepspeed(cfg: Config, world_size: int) -> bool:
    """parallel.engine=auto picks DeepSpeed when several ranks run or ZeRO is asked for."""
    p = cfg.parallel
    if p.engine == "auto":
        return world_size > 1 or p.zero_stage > 0
    return p.engine == "deepspeed"


def uses_process_groups(cfg: Config, world_size: int) -> bool:
    """Whether the run starts a process group: DeepSpeed's engines, or fairscale's."""
    return uses_deepspeed(cfg, world_size) or cfg.parallel.engine == "fairscale"


def fsdp_device_allowed(device: str) -> bool:
    """train.device values fairscale's FullyShardedDataParallel may be asked for (it runs on CUDA only; `auto`
    is checked again by the engine on the device it resolves to)."""
    return device != "cpu"


def check_fairscale(cfg: Config) -> None:
    """What the fairscale engine serves: data parallelism with OSS (+ ShardedDataParallel, or FSDP on CUDA),
    composed with tensor parallelism."""
    p, t = cfg.parallel, cfg.train
    _require(p.zero_stage in (1, 2, 3), f"parallel.engine='fairscale' shards the optimizer state: set "
             f"parallel.zero_stage to 1 (OSS), 2 (OSS + ShardedDataParallel) or 3 (FullyShardedDataParallel, "
             f"CUDA only), not {p.zero_stage}; for no sharding use parallel.engine=auto.")
    _require(p.pipeline == 1, f"parallel.engine='fairscale' has no pipeline schedule, but parallel.pipeline="
             f"{p.pipeline}. Use parallel.engine=auto (DeepSpeed's pipeline engine) or parallel.pipeline=1.")
    _require(t.precision != "fp16", "parallel.engine='fairscale' runs fp32 or bf16 (fp32 weights, bf16 autocast); "
             "train.precision=fp16 would need a sharded loss scaler. Use train.precision=bf16, or "
             "parallel.engine=deepspeed.")
    _require(not p.offload_optimizer, "parallel.offload_optimizer=true is DeepSpeed's: the fairscale engine keeps "
             "the optimizer state on the device. Set it to false, or use parallel.engine=deepspeed.")
    if p.zero_stage == 3:
        _require(fsdp_device_allowed(t.device), "parallel.engine='fairscale' with parallel.zero_stage=3 is fairscale's "
                 "FullyShardedDataParallel, which runs on CUDA GPUs only, but train.device='cpu'. Use "
                 "parallel.zero_stage=1 or 2, or parallel.engine=deepspeed.")


def check_parallel(cfg: Config, world_size: int) -> None:
    p = cfg.parallel
    _positive("parallel.tensor", p.tensor)
    _positive("parallel.pipeline", p.pipeline)
    _positive("parallel.checkpoint_every_n_layers", p.checkpoint_every_n_layers)
    _positive("parallel.collective_timeout", p.collective_timeout)
    _timeout("parallel.collective_timeout", p.collective_timeout)
    _require(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}.")
    check_tensor_parallel(cfg)
    data_parallel_size(cfg, world_size)  # the layout divides the world
    if p.pipeline > 1:
        _require(p.zero_stage <= 1, f"parallel.zero_stage={p.zero_stage} with parallel.pipeline={p.pipeline} is "
                 f"refused: DeepSpeed's pipeline engine supports ZeRO stages 0 and 1 only (ZeRO-2/3 would shard "
                 f"gradients or parameters that the pipeline schedule keeps per micro-batch). Use "
                 f"parallel.zero_stage=1.")
        method = p.partition_method
        _require(method in ("parameters", "uniform") or method.startswith("type:"),
                 f"parallel.partition_method={show(method)} is not known; use 'parameters', 'uniform' or "
                 f"'type:<regex of a layer class>' (e.g. 'type:BlockPipe').")
    if p.engine == "fairscale":
        check_fairscale(cfg)
    if p.engine == "torch":
        _require(world_size == 1 and p.zero_stage == 0,
                 f"parallel.engine='torch' runs one process without ZeRO, but the world size is {world_size} and "
                 f"parallel.zero_stage={p.zero_stage}. Use parallel.engine=auto (or deepspeed).")
    if p.offload_optimizer:
        _require(p.zero_stage >= 1, "parallel.offload_optimizer=true needs ZeRO: set parallel.zero_stage to 1, 2 "
                 "or 3.")
    if cfg.optim.name == "lamb" and uses_deepspeed(cfg, world_size):
        _require(p.zero_stage in (0, 1, 2),
                 f"optim.name='lamb' with parallel.zero_stage={p.zero_stage} is refused: ZeRO-3 partitions "
                 f"parameters so that bigtrain cannot compute LAMB's per-tensor trust ratios exactly. Use "
                 f"parallel.zero_stage=1 or 2 (exact), or optim.name=adamw.")
        _require(p.zero_stage > 0 or cfg.train.precision == "fp32",
                 f"optim.name='lamb' with train.precision={cfg.train.precision} and parallel.zero_stage=0 is refused: "
                 f"DeepSpeed's mixed-precision optimizer flattens all parameters, so the per-tensor trust ratios "
                 f"would be wrong. Use parallel.zero_stage=1 or 2 (exact), or train.precision=fp32.")
    if not uses_deepspeed(cfg, world_size):
        _require(not cfg.deepspeed, "The deepspeed: section is set but this run does not use DeepSpeed (one "
                 "process, zero_stage 0). Set parallel.engine=deepspeed, or remove the deepspeed: section.")


def check_training(cfg: Config, world_size: int) -> None:
    t = cfg.train
    _positive("train.steps", t.steps)
    _positive("train.global_batch_size", t.global_batch_size)
    _positive("train.micro_batch_size", t.micro_batch_size)
    dp = data_parallel_size(cfg, world_size)
    per_step = t.micro_batch_size * dp
    _require(t.global_batch_size % per_step == 0,
             f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
             f"{t.micro_batch_size} * data-parallel size {dp} = {per_step}. Use a global batch that is a "
             f"multiple of {per_step}, or a micro batch that divides {t.global_batch_size // dp}.")
    m_b = cfg.parallel.micro_batches
    if m_b is not None:
        steps = t.global_batch_size // per_step
        _require(m_b == steps, f"parallel.micro_batches={m_b} but train.global_batch_size={t.global_batch_size} / "
                 f"(train.micro_batch_size={t.micro_batch_size} * data-parallel size {dp}) = {steps} micro-batches "
                 f"per step. Set parallel.micro_batches={steps} or null (it follows from the batch sizes), or "
                 f"change train.micro_batch_size so that the division gives {m_b}.")
    _require(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}.")
    _positive("train.eval_batches", t.eval_batches)
    _require(t.early_stop_patience >= 0, f"train.early_stop_patience must be >= 0, got "
             f"{t.early_stop_patience}.")
    _require(t.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {t.sample_tokens}.")
    if t.threads is not None:
        _positive("train.threads", t.threads)
    _positive("train.max_skipped_steps", t.max_skipped_steps)
    _require(t.hang_timeout >= 0, f"train.hang_timeout must be >= 0 seconds (0 = no watchdog), got {t.hang_timeout}.")
    _timeout("train.hang_timeout", t.hang_timeout)

    o = cfg.optim
    _positive("optim.lr", o.lr)
    _fraction("optim.beta1", o.beta1)
    _fraction("optim.beta2", o.beta2)
    _positive("optim.eps", o.eps)
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
    _require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}.")
    if o.lamb_max_trust_ratio is not None:
        _positive("optim.lamb_max_trust_ratio", o.lamb_max_trust_ratio)

    s = cfg.schedule
    _require(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}.")
    if s.name == "noam":
        _require(s.warmup_steps > 0, "schedule.name='noam' divides by schedule.warmup_steps; set it > 0.")
        _positive("schedule.noam_scale", s.noam_scale)
    _fraction("schedule.min_lr_ratio", s.min_lr_ratio, high_open=False)
    _fraction("schedule.decay_fraction", s.decay_fraction, low_open=True, high_open=False)

    c, lg = cfg.checkpoint, cfg.log
    _require(c.every >= 0, f"checkpoint.every must be >= 0 (0 = only at the end), got {c.every}.")
    _positive("checkpoint.keep", c.keep)
    _require(c.layout_free_every >= 0, f"checkpoint.layout_free_every must be >= 0 (0 = never), got "
             f"{show(c.layout_free_every)}.")
    _positive("log.every", lg.every)
    if lg.peak_tflops is not None:
        _positive("log.peak_tflops", lg.peak_tflops)
    if lg.attention_images:
        check_attention_images(cfg)


def check_attention_images(cfg: Config) -> None:
    """log.attention_images draws whole attention layers held by one rank, into TensorBoard."""
    p = cfg.parallel
    _require(cfg.log.tensorboard, "log.attention_images=true draws into TensorBoard, but log.tensorboard=false. "
             "Set log.tensorboard=true, or log.attention_images=false.")
    _require(p.tensor == 1 and p.pipeline == 1,
             f"log.attention_images=true with parallel.tensor={p.tensor} and parallel.pipeline={p.pipeline} is "
             f"refused: the maps are drawn from whole attention layers on one rank, and tensor parallelism splits "
             f"them by heads, pipeline parallelism across stages. Use parallel.tensor=1 and parallel.pipeline=1 "
             f"(data parallelism and ZeRO work), or draw the maps after training with `bigtrain attention RUN_DIR "
             f"--text TEXT --out FILE.png`.")


def check_data(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    _require(d.seq_len >= 2, f"data.seq_len must be at least 2, got {d.seq_len}.")
    _fraction("data.holdout_fraction", d.holdout_fraction, low_open=True)
    _fraction("data.mask_prob", d.mask_prob, low_open=True)
    _positive("data.max_bytes", d.max_bytes)
    _positive("data.bucket_size", d.bucket_size)
    _positive("data.task_samples", d.task_samples)
    _require(1 <= d.task_min_len <= d.task_max_len,
             f"data.task_min_len={d.task_min_len} and data.task_max_len={d.task_max_len} must satisfy "
             f"1 <= task_min_len <= task_max_len.")
    _require(d.seq_len <= m.max_seq_len,
             f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; the model has no "
             f"positions beyond that. Lower data.seq_len or raise model.max_seq_len.")
    if d.source in ("reverse", "sort"):
        _require(m.family == "seq2seq", f"data.source='{d.source}' is a generated seq2seq task; it needs "
                 f"model.family='seq2seq' (got '{m.family}').")
    if d.document_masking:
        check_document_masking(cfg)
    if d.sources:
        check_sources(cfg)


def check_sources(cfg: Config) -> None:
    """A mixture: weights that are numbers >= 0 and not all zero, sources that are text, names unique."""
    d = cfg.data
    _require(cfg.model.family in ("causal", "masked"),
             f"data.sources (a mixture) draws text samples for the causal and masked families; model.family="
             f"'{cfg.model.family}' reads source/target pairs from data.source. Remove data.sources, or use "
             f"model.family=causal or masked.")
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        _require(isinstance(s.source, str) and s.source.strip() != "" and "\x00" not in s.source,
                 f"{key}.source must be a non-empty path, 'embedded' or hf:NAME, got {show(s.source)}.")
        _require(s.source not in ("reverse", "sort"), f"{key}.source='{s.source}' is a generated seq2seq task, "
                 f"not text: a mixture holds text sources (embedded, files, saved datasets, hf:NAME).")
        _require(math.isfinite(s.weight) and s.weight >= 0, f"{key}.weight must be a finite number >= 0 (its "
                 f"share of the samples, relative to the others), got {show(s.weight)}.")
    total = sum(s.weight for s in d.sources)
    _require(total > 0, f"data.sources: every weight is 0 ({[s.weight for s in d.sources]}), so no source would "
             f"be sampled. Give at least one source a positive weight.")
    names = [source_name(s.name, s.source) for s in d.sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    _require(not duplicates, f"data.sources: the names {duplicates} occur more than once (a name is derived from "
             f"the source unless given); set data.sources[i].name to tell them apart in the metrics.")


def source_name(name: str | None, source: str) -> str:
    """A mixture source's name in the metrics: `name`, else the source's last path component (or hf name)."""
    if name:
        return name
    stripped = source.rstrip("/")
    return stripped.rsplit("/", 1)[-1] or stripped


def check_document_masking(cfg: Config) -> None:
    """data.document_masking separates the documents that causal blocks pack together; no other family packs."""
    family = cfg.model.family
    why = {"masked": "whose samples are chunks of one document each", "seq2seq": "whose samples are one "
           "source/target pair each"}.get(family, "which does not pack documents")
    _require(family == "causal",
             f"data.document_masking=true stops attention at document boundaries inside the packed blocks of "
             f"model.family='causal', but model.family='{family}', {why}, so there is nothing to separate. "
             f"Set data.document_masking=false, or model.family=causal.")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Run every rule; raise ConfigError on the first that fails."""
    _require(isinstance(world_size, int) and world_size >= 1, f"The world size must be at least 1, got "
             f"{show(world_size)}.")
    check_numbers(cfg)
    check_paths(cfg)
    check_model(cfg)
    check_parallel(cfg, world_size)
    check_training(cfg, world_size)
    check_data(cfg)
