"""The configuration schema: one dataclass per section, one documented field per key.

Only the shape and per-field types live here; `bigtrain.config.checks` holds the rules that relate
fields to each other, and `bigtrain.config.loader` turns YAML and `section.key=value` overrides into
these objects.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field
from typing import Any, Literal


def opt(default: Any, help: str, path: bool = False, key: str | None = None) -> Any:
    """A dataclass field with a default and a help text (shown by `--help-config`); `path`: the value may be a
    file system path, whose leading `~` the loader expands; `key`: the name the key has in YAML and overrides
    when it cannot be the field's (a Python keyword: `checkpoint.async` is the field `async_`)."""
    return field(default=default, metadata={"help": help, "path": path, **({"key": key} if key else {})})


def key_name(f: Field) -> str:
    """The name of a config key as files, overrides, dumps and messages spell it."""
    return f.metadata.get("key", f.name)


@dataclass
class MoEConfig:
    """`model.moe`: mixture-of-experts feed-forward blocks (a softmax router picks top_k of `experts` per token)."""

    experts: int = opt(0, "routed experts E per MoE block; 0 = dense feed-forward blocks everywhere (the default)")
    top_k: int = opt(2, "experts each token is sent to (K <= experts); their router weights are renormalized to "
                     "sum to 1 (Mixtral)")
    every: int = opt(1, "every n-th block (blocks n-1, 2n-1, ... of each stack) is an MoE block; 1 = all blocks")
    shared_experts: int = opt(0, "always-on experts S added to every token's output (DeepSeek-MoE style)")
    d_ff: int | None = opt(None, "hidden width of each expert (routed and shared); null = model.d_ff")
    aux_loss_coef: float = opt(
        0.01, "weight of the load-balancing loss E * sum_e f_e * P_e (f_e: share of the top-k assignments going "
        "to expert e, P_e: mean router probability of e; 1 when balanced) added to the training loss")
    z_loss_coef: float = opt(
        0.0, "weight of the router z-loss mean_tokens(logsumexp(router logits)^2) added to the training loss")
    capacity_factor: float = opt(
        0.0, "0 = dropless routing; > 0: each expert takes at most ceil(capacity_factor * tokens * top_k / experts) "
        "assignments of a micro-batch (first choices first, then in token order); tokens beyond it skip that "
        "expert and keep only the residual")


@dataclass
class ModelConfig:
    family: Literal["causal", "masked", "seq2seq"] = opt(
        "causal", "causal: decoder-only LM (GPT); masked: encoder-only masked LM (BERT); "
        "seq2seq: encoder-decoder (T5 / the original Transformer)")
    vocab_size: int | None = opt(
        None, "vocabulary size; null = the tokenizer's size rounded up to `vocab_multiple`")
    vocab_multiple: int = opt(64, "pad an automatic vocabulary size up to a multiple of this")
    d_model: int = opt(512, "width of the residual stream")
    n_layers: int = opt(6, "number of blocks (for seq2seq: encoder blocks)")
    n_decoder_layers: int | None = opt(None, "seq2seq only: decoder blocks; null = n_layers")
    n_heads: int = opt(8, "attention heads")
    n_kv_heads: int | None = opt(
        None, "key/value heads for grouped-query attention; null = n_heads (multi-head attention)")
    d_ff: int = opt(2048, "hidden width of the position-wise feed-forward network")
    max_seq_len: int = opt(512, "longest sequence the model accepts (size of position tables)")
    positions: Literal["sinusoidal", "learned", "rotary", "relative", "none"] = opt(
        "sinusoidal", "position information: Vaswani et al. 2017's sinusoidal table, a learned table, rotary "
        "embeddings applied to queries and keys, T5's relative position bias (a learned scalar per head and distance "
        "bucket added to the attention scores, one table per stack), or none")
    rope_theta: float = opt(10000.0, "rotary base frequency")
    relative_buckets: int = opt(32, "positions=relative: distance buckets (half exact, half log-spaced)")
    relative_max_distance: int = opt(128, "positions=relative: distances from this on share the last bucket")
    scale_attention: bool = opt(True, "divide attention scores by sqrt(head size); T5 does not (false)")
    embedding_norm: bool = opt(False, "a LayerNorm on the summed input embeddings, before dropout (BERT)")
    type_vocab_size: int = opt(0, "token-type (segment) embeddings added to the input (BERT: 2); 0 = none")
    norm_position: Literal["post", "pre"] = opt(
        "post", "post: Vaswani et al. 2017's Add & Norm, x = norm(x + sublayer(x)); pre: x = x + sublayer(norm(x))")
    norm: Literal["layernorm", "rmsnorm"] = opt("layernorm", "normalization layer")
    norm_eps: float = opt(1e-5, "epsilon of the normalization layers")
    activation: Literal["relu", "gelu", "gelu_tanh", "swiglu"] = opt(
        "relu", "feed-forward activation: relu, gelu (exact, erf), gelu_tanh (GPT-2's tanh approximation), "
        "swiglu (a gated pair of input projections)")
    scale_embeddings: bool = opt(True, "multiply token embeddings by sqrt(d_model), as in Vaswani et al. 2017")
    tie_embeddings: bool = opt(True, "share the input embedding matrix with the output head")
    head_transform: bool = opt(
        False, "before the output head: dense d_model -> d_model, the activation, LayerNorm (BERT's MLM head)")
    head_bias: bool = opt(False, "a bias on the output logits, one per vocabulary entry (BERT)")
    scale_tied_output: bool = opt(
        False, "multiply the last hidden state by d_model^-0.5 before the tied output head (T5)")
    bias: bool = opt(True, "biases in linear layers and norms")
    dropout: float = opt(0.1, "dropout on embeddings, sublayer outputs and the FFN hidden layer")
    attention_dropout: float | None = opt(None, "dropout on attention weights; null = model.dropout")
    init: Literal["normal", "xavier"] = opt(
        "normal", "normal: N(0, init_std) with GPT-2's 1/sqrt(2L) scaling of residual projections; "
        "xavier: Xavier-uniform for linears")
    init_std: float = opt(0.02, "standard deviation of the normal init")
    init_from: str | None = opt(
        None, "start from these weights instead of the init (fine-tuning; fresh optimizer): a local Hugging "
        "Face model directory (config.json + safetensors) of GPT-2, Llama, Mixtral, GPT-NeoX, BERT or T5, or a "
        "bigtrain run.dir, checkpoint or export; the model section must describe the same architecture", path=True)
    moe: MoEConfig = field(default_factory=MoEConfig, metadata={"help": (
        "mixture-of-experts blocks {experts, top_k, every, shared_experts, d_ff, aux_loss_coef, z_loss_coef, "
        "capacity_factor}; experts=0 keeps every block dense. One process on the plain engine only for now")})


@dataclass
class ParallelConfig:
    tensor: int = opt(1, "tensor-parallel size (Megatron-style): heads, FFN width and vocabulary split over "
                      "this many ranks")
    sequence_parallel: bool = opt(
        False, "with tensor > 1: norms and residual dropout run on sequence shards (Korthikanti et al. 2022)")
    context: int = opt(1, "context-parallel size C: each rank of a context group holds 1/C of every sequence "
                       "(zig-zag: chunks i and 2C-1-i of 2C); data.seq_len must divide by 2C")
    context_attention: Literal["ring", "ulysses"] = opt(
        "ring", "with context > 1, the attention over the split sequence: ring (K/V blocks passed around the "
        "group, online-softmax merge; any head count) or ulysses (all-to-all to a head split; heads divisible by C)")
    pipeline: int = opt(1, "pipeline-parallel size (stages, DeepSpeed's pipeline engine, 1F1B schedule)")
    partition_method: str = opt(
        "parameters", "how layers are cut into pipeline stages: parameters (balance parameter counts), uniform "
        "(balance layer counts) or type:<regex> (balance layers whose class matches, e.g. type:BlockPipe)")
    pipeline_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b", "zero_bubble", "dualpipev"] = opt(
        "1f1b", "with pipeline > 1, the order of micro-batch forwards and backwards (torch.distributed.pipelining; "
        "DeepSpeed's pipeline engine runs 1f1b only): 1f1b, gpipe (all forwards, then all backwards), "
        "interleaved_1f1b (virtual_stages >= 2 stages per rank, in a loop), zero_bubble (interleaved, weight "
        "gradients deferred into the bubble; virtual_stages >= 2), dualpipev (virtual_stages = 2 in a V: rank r "
        "holds stages r and 2p-1-r; micro_batches >= 2p)")
    virtual_stages: int = opt(
        1, "pipeline stages per rank (V): the model is cut into pipeline x V stages; 1 for 1f1b and gpipe, >= 2 "
        "for interleaved_1f1b and zero_bubble, 2 for dualpipev")
    micro_batches: int | None = opt(
        None, "micro-batches per optimizer step on each data-parallel rank (the gradient-accumulation steps; "
        "with pipeline > 1, the micro-batches in flight); null = global_batch_size / (micro_batch_size * data)")
    data: int | None = opt(None, "data-parallel size; null = world size / (tensor * pipeline)")
    expert: int = opt(1, "expert-parallel size EP: the routed experts of every MoE block (model.moe) split over "
                      "groups of EP data-parallel ranks, tokens sent to their experts by all-to-all; EP divides "
                      "the data-parallel size and model.moe.experts")
    zero_stage: int = opt(0, "ZeRO optimizer sharding stage, 0-3")
    activation_checkpointing: Literal["none", "full", "selective"] = opt(
        "none", "recompute activations in backward: none, full blocks, or only the attention core")
    checkpoint_every_n_layers: int = opt(1, "full activation checkpointing: checkpoint every n-th block")
    offload_optimizer: bool = opt(False, "ZeRO 1-3: keep optimizer state and its update on the CPU (GPU runs)")
    collective_timeout: float = opt(
        600.0, "seconds a collective (all-reduce, barrier, ...) may wait for the other ranks before it fails")
    engine: Literal["auto", "torch", "deepspeed", "fairscale"] = opt(
        "auto", "auto: DeepSpeed when several ranks run or zero_stage > 0, else plain PyTorch; deepspeed: "
        "always DeepSpeed (also for one process); torch: plain PyTorch on one process, PyTorch's FSDP2 "
        "(zero_stage 2 or 3) on several; fairscale: fairscale's "
        "OSS (zero_stage 1), OSS + ShardedDataParallel (2) or FullyShardedDataParallel (3, CUDA only)")


@dataclass
class OptimConfig:
    name: Literal["adamw", "lamb"] = opt("adamw", "optimizer")
    lr: float = opt(1e-3, "peak learning rate (the `noam` schedule computes its own)")
    beta1: float = opt(0.9, "Adam/LAMB first-moment decay")
    beta2: float = opt(0.95, "Adam/LAMB second-moment decay")
    eps: float = opt(1e-8, "Adam/LAMB denominator epsilon")
    weight_decay: float = opt(0.1, "decoupled weight decay on matrices (never on biases or norm weights)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value; 0 disables clipping")
    lamb_max_trust_ratio: float | None = opt(
        10.0, "LAMB: upper bound on the per-tensor trust ratio ||w||/||update||; null = unbounded")


@dataclass
class ScheduleConfig:
    name: Literal["noam", "cosine", "linear", "constant", "wsd"] = opt(
        "cosine", "noam: Vaswani et al. 2017's d_model^-0.5 * min(step^-0.5, step * warmup^-1.5); "
        "cosine / linear: warmup then decay to min_lr_ratio * lr; constant: warmup then flat; "
        "wsd: warmup, stable, then linear decay over the last decay_fraction of steps")
    warmup_steps: int = opt(100, "linear warmup steps")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of optim.lr (cosine, linear, wsd)")
    decay_fraction: float = opt(0.2, "wsd: fraction of train.steps spent decaying")
    noam_scale: float = opt(1.0, "noam: multiplier on Vaswani et al. 2017's formula")


@dataclass
class SourceConfig:
    """One source of a mixture (`data.sources`)."""

    source: str = opt(
        "embedded", "like data.source: embedded, a .txt / .jsonl / .parquet file or directory, a folder saved by "
        "datasets' save_to_disk, or hf:NAME[:CONFIG][@SPLIT] (through datasets' own download and cache)",
        path=True)
    weight: float = opt(1.0, "share of the training samples, relative to the other sources' weights (>= 0)")
    name: str | None = opt(None, "name in the metrics; null = derived from the source")
    text_field: str | None = opt(None, "JSONL/Parquet/datasets column holding the text; null = data.text_field")


@dataclass
class DataConfig:
    source: str = opt(
        "embedded", "embedded: the Python standard library's source (no download); seq2seq tasks "
        "`reverse` / `sort` are generated; otherwise a path to a .txt / .jsonl / .parquet file or a "
        "directory of them", path=True)
    sources: list[SourceConfig] = field(default_factory=list, metadata={"help": (
        "a mixture instead of data.source: a list of {source, weight, name, text_field}; training samples are "
        "drawn from each in proportion to its weight, deterministically by global sample index (the same "
        "batches under any layout), with per-source tokens and epochs in the metrics; causal and masked "
        "families")})
    format: Literal["auto", "text", "jsonl", "parquet"] = opt("auto", "file format; auto = from the suffix")
    text_field: str = opt("text", "JSONL/Parquet column holding the text")
    source_field: str = opt("source", "seq2seq files: column holding the input text")
    target_field: str = opt("target", "seq2seq files: column holding the output text")
    tokenizer: str = opt("byte", "byte: byte-level (256 bytes + specials); or a path to a tokenizer.json",
                         path=True)
    seq_len: int = opt(128, "tokens per training sequence (causal: block length)")
    document_masking: bool = opt(
        False, "causal only: inside a packed block, attention stops at document boundaries (block-diagonal causal "
        "mask) and positions restart at 0 with each document, so each document trains as if alone; the target "
        "after a document's end-of-document token is still the next document's first token")
    max_bytes: int = opt(4_000_000, "cap on the embedded corpus size in bytes")
    holdout_fraction: float = opt(0.02, "fraction of the data held out for evaluation")
    mask_prob: float = opt(0.15, "masked LM: fraction of tokens selected for prediction")
    task_samples: int = opt(20000, "generated seq2seq tasks: number of examples")
    task_min_len: int = opt(4, "generated seq2seq tasks: shortest sequence")
    task_max_len: int = opt(16, "generated seq2seq tasks: longest sequence")
    cache_dir: str = opt(".cache/bigtrain", "where tokenized corpora are cached as memory-mapped files", path=True)
    bucket_size: int = opt(64, "padded families: batches are formed from windows of this many global "
                           "batches sorted by length (1 disables bucketing)")
    encoding_errors: Literal["strict", "replace"] = opt(
        "strict", "text that is not valid UTF-8: strict = stop, naming the file and byte offset; replace = "
        "replace undecodable bytes by U+FFFD and warn with their count")
    verify_shards: Literal["auto", "all"] = opt(
        "auto", "before training, compare prepared token shards with the SHA-256s of their index.json (a shard "
        "changed in place stops the run, naming it): auto = every shard of a corpus up to 4 GiB of token files, "
        "above that a random sample of about 4 GiB drawn anew at each start (the console states the fraction); "
        "all = every shard")


@dataclass
class TrainConfig:
    steps: int = opt(1000, "optimizer steps")
    seed: int = opt(1234, "seed of weights, data order, masks and dropout")
    global_batch_size: int = opt(32, "sequences per optimizer step, over all data-parallel ranks")
    micro_batch_size: int = opt(32, "sequences per forward/backward on one rank")
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = opt(
        "fp32", "fp32; bf16 autocast; fp16 autocast with dynamic loss scaling (CUDA only); fp8: the Linear layers "
        "of every block multiply in FP8 through torchao (emulated on CPU; CUDA needs compute capability >= 8.9), "
        "everything else runs as under bf16 (docs/fp8.md)")
    fp8_recipe: Literal["tensorwise", "rowwise"] = opt(
        "tensorwise", "precision=fp8: one scale per tensor, or one per row of each operand (torchao's recipes)")
    fp8_check_every: int = opt(
        50, "precision=fp8: every n-th step the step's first micro-batch also runs in bf16 on the same weights "
        "and the relative differences of the loss and of each block's update are logged; 0 = never")
    fp8_tolerance: float = opt(
        0.1, "precision=fp8: a block whose relative difference from bf16 exceeds this in 3 checks in a row falls "
        "back to bf16 for the rest of the run (kept across resumes)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto = cuda if available, else cpu")
    eval_every: int = opt(200, "steps between evaluations; 0 = only at the end")
    eval_samples: int | None = opt(
        None, "held-out sequences per evaluation: the first ones of the held-out split (a mixture: an equal share "
        "of each source's), fewer if it is smaller; the same set, and the same eval_loss, under every layout and "
        "micro-batch size; null = 512, or train.eval_batches x train.micro_batch_size where a config sets that")
    eval_batches: int | None = opt(
        None, "superseded by train.eval_samples (it counted micro-batches, so the held-out set changed with "
        "train.micro_batch_size); still read from older configs and checkpoints, where it means eval_batches x "
        "micro_batch_size sequences; ignored when train.eval_samples is set")
    early_stop_patience: int = opt(0, "stop after this many evaluations without improvement; 0 = off")
    on_nonfinite: Literal["stop", "skip"] = opt(
        "stop", "a NaN/inf loss or gradient: stop with an error, or skip that step's update")
    max_skipped_steps: int = opt(
        10, "with on_nonfinite=skip: stop with an error after this many skipped steps in a row")
    hang_timeout: float = opt(
        1800.0, "seconds a training step, evaluation or checkpoint save may take before the watchdog writes every "
        "thread's stack to run.dir and exits the rank (status 4); 0 = no watchdog (start-up is not watched)")
    sample_tokens: int = opt(200, "causal LM: tokens of text sampled at the end of the run; 0 = none")
    sample_prompt: str = opt("def ", "causal LM: prompt of the final sample")
    threads: int | None = opt(None, "CPU threads for torch; null = torch's default")
    compile: bool = opt(
        False, "torch.compile each transformer block (regional: compile time does not grow with depth); composes "
        "with activation checkpointing, tensor parallelism, ZeRO and the pipeline engine")


@dataclass
class CheckpointConfig:
    every: int = opt(500, "steps between checkpoints; 0 = only at the end")
    keep: int = opt(2, "complete checkpoints kept on disk (older ones are deleted)")
    resume: bool = opt(True, "resume from run.dir's latest checkpoint if there is one")
    layout_free_every: int | None = opt(
        None, "write the layout-free form (unsplit fp32 weights and optimizer moments, 12 bytes per parameter, about "
        "as much disk as the engine's own files; resumable under any layout) with every n-th checkpoint and always "
        "with the last one (the end of the run, a stop); 0 = never (the engine's own files only); null = every "
        "checkpoint when the form is at most 16 GiB (1.4B parameters), else only with the last one")
    async_: bool = opt(
        False, "save without stopping training: at a save step each rank copies its state to host memory (pinned "
        "on GPUs) and one background thread per rank writes the same files a synchronous save writes; `latest` "
        "moves at a later step boundary once every rank's writer is done; at most one save in flight (the next "
        "one waits for it); the end of the run and stop signals wait for the writer", key="async")


@dataclass
class MlflowConfig:
    """`log.mlflow`: where MLflow records the run (rank 0)."""

    experiment: str = opt(
        "", "MLflow experiment the run is recorded in (created when missing); empty = no MLflow recording")
    tracking_uri: str = opt(
        "", "MLflow tracking store: a server (http://host:5000) or a database URI (sqlite:///path/mlflow.db, "
        "postgresql://...); empty = a sqlite store in run.dir (run.dir/mlflow.db, artifacts in run.dir/mlartifacts)")


@dataclass
class WandbConfig:
    """`log.wandb`: where Weights & Biases records the run (rank 0)."""

    project: str = opt("", "W&B project the run is recorded in; empty = no W&B recording")
    mode: Literal["online", "offline"] = opt(
        "online", "online: sent to the W&B server as the run trains; offline: written to run.dir/wandb only (no "
        "network; `wandb sync` uploads it later)")


@dataclass
class LogConfig:
    every: int = opt(10, "steps between training lines (console and metrics.jsonl)")
    tensorboard: bool = opt(True, "write TensorBoard events (with per-layer gradient norms) to run.dir")
    progress: bool = opt(True, "show a live progress bar when the output is a terminal")
    peak_tflops: float | None = opt(
        None, "peak FLOP/s (in TFLOP/s) of one device for MFU; null = looked up for known GPUs")
    attention_images: bool = opt(
        False, "at each evaluation, log the attention maps (layers x heads) of the first held-out sample to "
        "TensorBoard as an image (needs log.tensorboard and matplotlib)")
    verbose: bool = opt(
        False, "print everything at start: the engine's derived config, every rank's memory table, DeepSpeed's own "
        "messages (`bigtrain train --verbose`); by default they go to run.dir files only")
    mlflow: MlflowConfig = field(default_factory=MlflowConfig, metadata={"help": (
        "record the run in MLflow: {experiment, tracking_uri}; rank 0 logs the config (params), every metrics.jsonl "
        "line, attention images and the final checkpoint path; a resumed run continues the same MLflow run "
        "(its id is kept in run.dir/tracking.json)")})
    wandb: WandbConfig = field(default_factory=WandbConfig, metadata={"help": (
        "record the run in Weights & Biases: {project, mode}; the same records as log.mlflow, the W&B run id kept "
        "in run.dir/tracking.json so that a resumed run continues it")})


@dataclass
class RunConfig:
    dir: str = opt("runs/smoke", "where the run writes config.yaml, metrics.jsonl, checkpoints/, "
                   "tensorboard/; re-running with the same dir resumes", path=True)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "advanced DeepSpeed config keys, merged into the config bigtrain derives (e.g. "
        "zero_optimization.reduce_bucket_size); keys that bigtrain sets from its own config must not "
        "contradict it")})
