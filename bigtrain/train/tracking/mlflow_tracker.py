"""`log.mlflow`: the run recorded in an MLflow tracking store through `MlflowClient` (no global active run).

    params     the effective config, flattened (model.d_model = 32); a resume whose config differs keeps the first
               value (MLflow parameters cannot change) and records the new one as the tag `config.<key>`
    metrics    every metrics.jsonl line's scalars at its step (`protocol.record_scalars`)
    artifacts  config.yaml of the latest start; attention images under images/
    tags       final_checkpoint = the path of the run's last checkpoint (and final_checkpoint_step)

The store is `log.mlflow.tracking_uri`, or `sqlite:///<run.dir>/mlflow.db` with artifacts in run.dir/mlartifacts
when that is empty. A resumed start continues the run named in run.dir/tracking.json (`run_ids.RunIds`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from bigtrain.config import MlflowConfig
from bigtrain.train.tracking.protocol import flat_config, record_scalars
from bigtrain.train.tracking.run_ids import RunIds

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def local_store(run_dir: Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of the default store inside run.dir."""
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}", (run_dir.resolve() / "mlartifacts").as_uri()


class MlflowTracker:
    """One MLflow run, created or continued at construction."""

    def __init__(self, cfg: MlflowConfig, run_dir: Path, ids: RunIds, resuming: bool) -> None:
        from mlflow.tracking import MlflowClient

        uri, artifacts = local_store(run_dir) if not cfg.tracking_uri else (cfg.tracking_uri, None)
        self.client = MlflowClient(tracking_uri=uri)
        where = {"tracking_uri": uri, "experiment": cfg.experiment}
        run_id = ids.reusable("mlflow", where, resuming)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(cfg.experiment, artifact_location=artifacts))
            run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
            ids.remember("mlflow", run_id, where)
        self.run_id = run_id

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.run_id).data.params
        params, tags = [], []
        for key, value in flat_config(config).items():
            value = value[:MAX_PARAM_CHARS]
            if key not in have:
                params.append(Param(key, value))
            elif have[key] != value:
                tags.append(RunTag(f"config.{key}", value))
        for start in range(0, max(len(params), len(tags)), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100], tags=tags[start:start + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def log_record(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, now = int(record.get("step", 0)), int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in record_scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self.client.log_image(self.run_id, image, key=tag.replace(" ", "_"), step=step)

    def log_checkpoint(self, path: Path, step: int) -> None:
        self.client.set_tag(self.run_id, "final_checkpoint", str(path.resolve()))
        self.client.set_tag(self.run_id, "final_checkpoint_step", str(step))

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "FAILED")
