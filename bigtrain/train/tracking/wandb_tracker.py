"""`log.wandb`: the run recorded in Weights & Biases.

    config    the effective config (nested, as config.yaml); a resume updates it (allow_val_change)
    history   every metrics.jsonl line's scalars at its step (`protocol.record_scalars`); W&B steps only grow, so
              a step re-run after an interruption keeps the value first recorded (bigtrain's resume repeats it)
    media     attention images (wandb.Image)
    summary   final_checkpoint = the path of the run's last checkpoint (and final_checkpoint_step)

Files go under run.dir/wandb (`dir=run.dir`); `mode: offline` writes them there only, with no network (`wandb sync
run.dir/wandb/offline-run-*` uploads them later). A resumed start continues the W&B run id kept in
run.dir/tracking.json (`resume="allow"`); offline, each start writes its own offline-run folder of that id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigtrain.config import WandbConfig
from bigtrain.train.tracking.protocol import record_scalars
from bigtrain.train.tracking.run_ids import RunIds


class WandbTracker:
    """One W&B run, created or continued at construction."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, ids: RunIds, resuming: bool) -> None:
        import wandb

        where = {"project": cfg.project}
        run_id = ids.reusable("wandb", where, resuming)
        settings = wandb.Settings(mode=cfg.mode, silent=True, console="off", save_code=False)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, dir=str(run_dir.resolve()), id=run_id,
                              resume="allow", name=run_dir.resolve().name, settings=settings)
        ids.remember("wandb", self.run.id, where)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_record(self, record: dict[str, Any]) -> None:
        scalars = record_scalars(record)
        if scalars:
            self.run.log(scalars, step=int(record.get("step", 0)))

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def log_checkpoint(self, path: Path, step: int) -> None:
        self.run.summary["final_checkpoint"] = str(path.resolve())
        self.run.summary["final_checkpoint_step"] = step

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
        self.wandb.teardown()  # stops W&B's service process, which writes out the run file (offline) before it ends
