"""The checks of a run that need more than the config file: the parallel layer's (pipeline stages of the
built model) and the engine's (the DeepSpeed config derived from bigtrain's, with its passthrough keys). They
run after `load_config` and before any process group, allocation or data; `load_config` alone stays free of
torch and DeepSpeed."""

from __future__ import annotations

from pathlib import Path

from bigtrain.config import Config, load_config
from bigtrain.config.checks import data_parallel_size, uses_deepspeed
from bigtrain.config.deepspeed import derive_deepspeed_config
from bigtrain.parallel.validate import check_layout


def validate_run(cfg: Config, world_size: int) -> None:
    """Raise ConfigError (naming the keys) if `cfg` cannot run on `world_size` ranks."""
    check_layout(cfg)
    if uses_deepspeed(cfg, world_size):
        derive_deepspeed_config(cfg, data_parallel_size(cfg, world_size))  # a contradicting deepspeed: key


def load_run_config(path: str | Path | None, overrides: list[str] | None = None, world_size: int = 1) -> Config:
    """`load_config`, then `validate_run`: what the commands use before they start work."""
    cfg = load_config(path, overrides, world_size=world_size)
    validate_run(cfg, world_size)
    return cfg
