"""Experiment tracking (issue 31, item 3): a run recorded in a local MLflow store and in W&B offline mode reads
back with the values of its metrics.jsonl, and a resumed run continues the same MLflow run and W&B run id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigtrain.checkpoint.integrity import read_latest
from bigtrain.errors import ConfigError, TrainingError
from bigtrain.train.tracking.protocol import Trackers, flat_config, record_scalars
from tests.conftest import launch_ok, require_module, tiny_config, tiny_overrides
from tests.helpers.wandb_records import run_contents

TRACKED = ("log.mlflow.experiment=bigtrain-test", "log.wandb.project=bigtrain-test", "log.wandb.mode=offline",
           "train.eval_every=3", "log.attention_images=true", "checkpoint.every=3")
COMPARED = ("loss", "lr", "grad_norm", "tokens", "eval_loss", "eval_ppl")


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of metrics.jsonl for the compared keys."""
    out: dict[int, dict[str, float]] = {}
    for line in _lines(run_dir):
        out.setdefault(line["step"], {}).update({k: line[k] for k in COMPARED if line.get(k) is not None})
    return out


def _mlflow_values(client, run_id: str) -> dict[int, dict[str, float]]:
    """{step: {key: value}}, the last value recorded at each step."""
    out: dict[int, dict[str, float]] = {}
    for key in COMPARED:
        for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            out.setdefault(metric.step, {})[key] = metric.value
    return out


def _wandb_runs(run_dir: Path) -> list[dict]:
    return [run_contents(f) for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]


def _train(run_dir: Path, steps: int):
    from bigtrain.train.trainer import Trainer

    return Trainer(tiny_config(run_dir, "causal", f"train.steps={steps}", *TRACKED)).run()


@pytest.mark.launches
def test_mlflow_and_wandb_offline_record_the_metrics_across_a_resume(tmp_path: Path) -> None:
    require_module("mlflow", "mlflow is not installed (pip install -e .[dev])")
    require_module("wandb", "wandb is not installed (pip install -e .[dev])")
    from mlflow.tracking import MlflowClient

    from bigtrain.train.tracking.mlflow_tracker import local_store

    run_dir = tmp_path / "run"
    _train(run_dir, 6)
    ids = json.loads((run_dir / "tracking.json").read_text())
    first_wandb = _wandb_runs(run_dir)
    assert len(first_wandb) == 1 and first_wandb[0]["run_id"] == ids["wandb"]["run_id"]
    _train(run_dir, 9)  # resumes from step 6
    assert json.loads((run_dir / "tracking.json").read_text()) == ids, "the resume opened new tracker runs"

    expected = _expected(run_dir)
    assert set(expected) == set(range(1, 10)) and all("eval_loss" in expected[s] for s in (3, 6, 9))
    client = MlflowClient(tracking_uri=local_store(run_dir)[0])
    run_id = ids["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    assert _mlflow_values(client, run_id) == expected
    assert run.data.params["model.d_model"] == "32" and run.data.params["train.steps"] == "6"
    assert run.data.tags["config.train.steps"] == "9"  # MLflow params cannot change: the resume's value is a tag
    final = read_latest(run_dir / "checkpoints")[0].resolve()
    assert final.name.endswith("09")
    assert run.data.tags["final_checkpoint"] == str(final) and final.is_dir()
    assert run.info.status == "FINISHED"
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert sum(p.endswith(".png") and "attention" in p for p in images) == 3, images

    runs = _wandb_runs(run_dir)
    assert len(runs) == 2 and {r["run_id"] for r in runs} == {ids["wandb"]["run_id"]}
    history: dict[int, dict] = {}
    for r in runs:
        for step, row in r["history"].items():
            history.setdefault(step, {}).update(row)
    assert {s: {k: v for k, v in row.items() if k in COMPARED} for s, row in history.items()} == expected
    assert sum("attention_maps/path" in row or "attention_maps" in row for row in history.values()) == 3
    assert runs[1]["summary"]["final_checkpoint"] == str(final)
    assert runs[0]["config"]["model"]["d_model"] == 32 and runs[1]["config"]["train"]["steps"] == 9


@pytest.mark.launches
def test_only_rank_0_records_under_two_ranks(tmp_path: Path) -> None:
    """Two data-parallel ranks (DeepSpeed's engine under torchrun): one MLflow run and one W&B run, rank 0's, with
    the values of metrics.jsonl."""
    require_module("mlflow", "mlflow is not installed (pip install -e .[dev])")
    require_module("wandb", "wandb is not installed (pip install -e .[dev])")
    from mlflow.tracking import MlflowClient

    from bigtrain.train.tracking.mlflow_tracker import local_store

    run_dir = tmp_path / "run"
    launch_ok(2, tiny_overrides(run_dir, "causal", "train.steps=4", "train.micro_batch_size=4", *TRACKED))
    expected = _expected(run_dir)
    client = MlflowClient(tracking_uri=local_store(run_dir)[0])
    experiment = client.get_experiment_by_name("bigtrain-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and _mlflow_values(client, runs[0].info.run_id) == expected
    wandb_runs = _wandb_runs(run_dir)
    assert len(wandb_runs) == 1
    assert {s: {k: v for k, v in row.items() if k in COMPARED}
            for s, row in wandb_runs[0]["history"].items()} == expected


def test_record_scalars_flatten_nested_numbers_and_drop_the_rest() -> None:
    record = {"step": 4, "loss": 2.5, "skipped": False, "mfu": None, "eval_sources": {"web": {"eval_loss": 1.0}},
              "note": "text", "grad_norm": float("nan")}
    assert record_scalars(record) == {"loss": 2.5, "skipped": 0.0, "eval_sources/web/eval_loss": 1.0}
    assert flat_config({"model": {"d_model": 32, "vocab_size": None}, "deepspeed": {}}) == {
        "model.d_model": "32", "model.vocab_size": "null", "deepspeed": "{}"}


@pytest.mark.parametrize(("overrides", "match"), [
    (["log.mlflow.tracking_uri=http://x:5000"], r"log\.mlflow\.tracking_uri='http://x:5000' is set but "
                                                 r"log\.mlflow\.experiment is empty"),
    (["log.mlflow.experiment=x", "log.mlflow.tracking_uri=mlruns"], r"log\.mlflow\.tracking_uri='mlruns' is not a "
                                                                       r"URI"),
    (["log.wandb.project=a/b"], r"log\.wandb\.project='a/b' holds /, which W&B does not allow"),
    (["log.wandb.mode=cloud"], r"'log\.wandb\.mode' has value 'cloud', which is not allowed\. Allowed values: "
                                r"'online', 'offline'"),
    (["log.mlflow.experiment=' x'"], r"log\.mlflow\.experiment=' x' starts or ends with white space"),
])
def test_bad_tracker_config_is_refused_at_load(tmp_path: Path, overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path / "run", "causal", *overrides)


class _Recorder:
    def __init__(self, fail: bool) -> None:
        self.fail, self.records = fail, []

    def log_record(self, record: dict) -> None:
        if self.fail:
            raise ConnectionError("server gone")
        self.records.append(record)


def test_a_tracker_that_fails_while_training_is_left_out_with_one_warning(capsys) -> None:
    broken, working = _Recorder(fail=True), _Recorder(fail=False)
    trackers = Trackers([broken, working])
    trackers.log_record({"step": 1, "loss": 2.0})
    trackers.log_record({"step": 2, "loss": 1.0})
    assert working.records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}] and trackers.trackers == [working]
    err = capsys.readouterr().err
    assert err.count("warning: _Recorder.log_record failed (ConnectionError: server gone)") == 1


@pytest.mark.launches
def test_a_tracker_that_cannot_start_stops_the_run_and_frees_run_dir(tmp_path: Path, monkeypatch) -> None:
    from bigtrain.train import trainer as trainer_module

    def refuse(*args, **kwargs):
        raise RuntimeError("no API key")

    monkeypatch.setattr(trainer_module, "build_tracker", refuse)
    cfg = tiny_config(tmp_path / "run", "causal", "train.steps=1", "log.mlflow.experiment=x")
    with pytest.raises(TrainingError, match="experiment tracker of log.mlflow / log.wandb could not start: "
                                            "RuntimeError: no API key"):
        trainer_module.Trainer(cfg).run()
    monkeypatch.undo()
    assert trainer_module.Trainer(tiny_config(tmp_path / "run", "causal", "train.steps=1")).run().state.step == 1
