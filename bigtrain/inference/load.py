"""A model holding the weights of whatever `bigtrain.checkpoint.weights.load_weights` accepts (a run.dir, a
checkpoint, an exported or consolidated folder): on one device (`evaluate`, `generate`, `attention`), or split
over the tensor-parallel ranks of a launcher (`generate` of a model that does not fit one device)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.config import Config
from bigtrain.data import Tokenizer
from bigtrain.io import load_state
from bigtrain.models import TransformerLM


@dataclass
class LoadedModel:
    cfg: Config
    tokenizer: Tokenizer
    model: TransformerLM
    device: torch.device
    full_logits: Callable[[torch.Tensor], torch.Tensor] | None = None  # gathers vocabulary shards (tensor > 1)
    pad_multiple: int = 1  # sequence parallelism: lengths a multiple of the tensor size
    is_main: bool = True


def load_model(path: Path, overrides: list[str] | None = None, step: int | None = None) -> LoadedModel:
    """The run's config (one-device layout, `overrides` applied), its tokenizer, and the model holding the
    weights at `path` (a run.dir: its checkpoint of `step`, default the latest)."""
    from bigtrain.checkpoint.weights import load_weights, with_tied
    from bigtrain.config.loader import config_from_dict
    from bigtrain.data import build_tokenizer
    from bigtrain.distributed.device import resolve_device
    from bigtrain.models import build_model, resolve_vocab_size

    raw, state = load_weights(path, step)
    cfg = config_from_dict(raw, overrides=overrides)
    device = resolve_device(cfg.train)
    tokenizer = build_tokenizer(cfg.data)
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, tokenizer.vocab_size), device)
    load_state(model, with_tied(state, cfg.model.tie_embeddings), path)
    return LoadedModel(cfg, tokenizer, model, device)


def load_tensor_parallel(path: Path, overrides: list[str] | None = None, step: int | None = None) -> LoadedModel:
    """Under a launcher with W ranks: the model split W ways by tensor parallelism (parallel.tensor=W, no
    pipeline, one data replica), each rank reading only its shards of the weights at `path` (box reads of a
    layout-free checkpoint). Overrides may set parallel.sequence_parallel."""
    from bigtrain.checkpoint.state import StateAdapter
    from bigtrain.checkpoint.weights import weights_config, weights_reader
    from bigtrain.config.loader import config_from_dict_and_layout
    from bigtrain.config.model_checks import tensor_split_problems
    from bigtrain.data import build_tokenizer
    from bigtrain.distributed import detect_env, init_process_group
    from bigtrain.distributed.device import resolve_device
    from bigtrain.distributed.groups import ParallelGroups
    from bigtrain.engine.base import ShardedState
    from bigtrain.errors import ConfigError
    from bigtrain.models import build_model, resolve_vocab_size
    from bigtrain.parallel import parallelize

    env = detect_env()
    # A one-off command: no compile time (train.compile of the run is for training).
    layout = [f"parallel.tensor={env.world_size}", "parallel.pipeline=1", "parallel.data=1", "train.compile=false",
              "parallel.context=1", "parallel.pipeline_schedule=1f1b", "parallel.virtual_stages=1"]
    cfg, resolved = config_from_dict_and_layout(weights_config(path, step), world_size=env.world_size,
                                                overrides=[*layout, *(overrides or [])])
    tokenizer = build_tokenizer(cfg.data)
    vocab = resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    problems = tensor_split_problems(cfg.model, vocab, env.world_size)
    if problems:
        raise ConfigError(f"{path} cannot be split over {env.world_size} tensor-parallel ranks: {problems[0]}")
    device = resolve_device(cfg.train, env.local_rank)
    init_process_group(env, device)
    groups = ParallelGroups(resolved, env.rank, on_gpu=device.type == "cuda")
    parallel = parallelize(build_model(cfg.model, vocab, "meta"), cfg, groups, device)
    reader = weights_reader(path, cfg.model, vocab, step)
    try:
        weights_only = torch.optim.SGD(list(parallel.model.parameters()), lr=0.0)  # no optimizer state to read
        StateAdapter(ShardedState(parallel.model, parallel.shards, weights_only,
                                  tensor_rank=groups.get_tensor_model_parallel_rank())).restore(reader, 0.0)
    finally:
        reader.close()
    return LoadedModel(cfg, tokenizer, parallel.model, device, parallel.criterion.full_logits,
                       parallel.pad_multiple, env.is_main)
