"""Rules of the experiment trackers (`log.mlflow`, `log.wandb`) at load time.

A tracker is on when its name key is set (`log.mlflow.experiment`, `log.wandb.project`); its package must then be
importable, so that a run does not fail after its first step. A tracking URI names a server or a database
(MLflow 3 refuses a plain folder, its old file store). W&B refuses project names with / \\ # ? % : (they
are path and URL separators of its server); a tracking URI without an experiment would record nothing.
"""

from __future__ import annotations

import importlib.util

from bigtrain.config.rules import require, show
from bigtrain.config.schema import Config

WANDB_PROJECT_FORBIDDEN = "/\\#?%:"
WANDB_PROJECT_MAX = 128


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_log_trackers(cfg: Config) -> None:
    """Refuse a tracker config that cannot record, naming the key, its value and what is allowed."""
    mf, wb = cfg.log.mlflow, cfg.log.wandb
    require(mf.experiment or not mf.tracking_uri, f"log.mlflow.tracking_uri={show(mf.tracking_uri)} is set but "
            f"log.mlflow.experiment is empty, so nothing would be recorded. Name the experiment "
            f"(log.mlflow.experiment=NAME) or drop the tracking URI.")
    require(mf.experiment == mf.experiment.strip(), f"log.mlflow.experiment={show(mf.experiment)} starts or ends "
            f"with white space; give the experiment's name without it.")
    require(not mf.tracking_uri or "://" in mf.tracking_uri or mf.tracking_uri.startswith("databricks"),
            f"log.mlflow.tracking_uri={show(mf.tracking_uri)} is not a URI: give a server (http://host:5000) or a "
            f"database (sqlite:///path/mlflow.db), or leave it empty for a sqlite store in run.dir (a plain folder "
            f"is MLflow's file store, which MLflow 3 refuses).")
    if mf.experiment:
        require(_installed("mlflow"), f"log.mlflow.experiment={show(mf.experiment)} records the run in MLflow, "
                f"but the mlflow package is not installed. Install it (pip install mlflow) or set "
                f"log.mlflow.experiment='' (no MLflow recording).")
    if wb.project:
        bad = sorted({c for c in wb.project if c in WANDB_PROJECT_FORBIDDEN})
        require(not bad, f"log.wandb.project={show(wb.project)} holds {' '.join(bad)}, which W&B does not allow "
                f"in a project name (none of {' '.join(WANDB_PROJECT_FORBIDDEN)}).")
        require(len(wb.project) <= WANDB_PROJECT_MAX and wb.project.strip() == wb.project, f"log.wandb.project="
                f"{show(wb.project)} must be at most {WANDB_PROJECT_MAX} characters, without leading or trailing "
                f"white space.")
        require(_installed("wandb"), f"log.wandb.project={show(wb.project)} records the run in Weights & Biases, "
                f"but the wandb package is not installed. Install it (pip install wandb) or set "
                f"log.wandb.project='' (no W&B recording).")
