"""The trackers of a run, chosen once from `log.mlflow` / `log.wandb` (rank 0; other ranks record nothing)."""

from __future__ import annotations

from pathlib import Path

from bigtrain.config import Config
from bigtrain.train.tracking.protocol import NoTracker, Tracker, Trackers
from bigtrain.train.tracking.run_ids import RunIds


def build_tracker(cfg: Config, run_dir: Path, is_main: bool, resuming: bool) -> Tracker:
    """MLflow when log.mlflow.experiment is set, W&B when log.wandb.project is set, both, or none; `resuming`: the
    run continues from a checkpoint, so it continues the tracker runs named in run.dir/tracking.json. Starting a
    tracker that fails (a server that does not answer, W&B online without a login) ends the start with its error;
    a failure later leaves that tracker out (`Trackers`)."""
    mf, wb = cfg.log.mlflow, cfg.log.wandb
    if not is_main or not (mf.experiment or wb.project):
        return NoTracker()
    ids, trackers = RunIds(run_dir), []
    try:
        if mf.experiment:
            from bigtrain.train.tracking.mlflow_tracker import MlflowTracker

            trackers.append(MlflowTracker(mf, run_dir, ids, resuming))
        if wb.project:
            from bigtrain.train.tracking.wandb_tracker import WandbTracker

            trackers.append(WandbTracker(wb, run_dir, ids, resuming))
    except BaseException:
        Trackers(trackers).close(finished=False)
        raise
    return Trackers(trackers)
