"""Experiment trackers: MLflow (`log.mlflow`) and Weights & Biases (`log.wandb`) record what metrics.jsonl and
TensorBoard hold. `build_tracker` chooses them once from the config; the trainer passes the result down."""

from bigtrain.train.tracking.build import build_tracker
from bigtrain.train.tracking.protocol import NoTracker, Tracker

__all__ = ["NoTracker", "Tracker", "build_tracker"]
