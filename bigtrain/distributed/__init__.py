"""Process discovery and process groups; nothing here is imported by the model files."""

from bigtrain.distributed.env import DistEnv, detect_env, init_process_group, shutdown_process_group

__all__ = ["DistEnv", "detect_env", "init_process_group", "shutdown_process_group"]
