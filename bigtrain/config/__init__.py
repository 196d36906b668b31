"""Typed configuration: dataclasses (schema), YAML + dotted overrides (loader), cross-field checks."""

from bigtrain.config.loader import config_to_dict, dump_config, load_config, parse_overrides
from bigtrain.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LogConfig,
    MlflowConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "LogConfig",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "WandbConfig",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
]
