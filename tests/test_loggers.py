"""Every logger's files, read back with the tracker's own reader: TensorBoard's event accumulator,
MLflow's client, and W&B's protobuf records; hyperparameters and the final run record included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose_train
from moe_lab.lit.loggers import PREFIX, record_fields
from moe_lab.train import train
from wandb_log import settled_records
from wandb_log import wandb_key as _key

TINY = [
    "data=mnist1d",
    "model=moe",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict]:
    """One tiny run with every logger at once (the list syntax of the command line)."""
    run_dir = tmp_path_factory.mktemp("loggers") / "run"
    cfg = compose_train([*TINY, "logger=[csv,tensorboard,mlflow,wandb]"], run_dir, data_dir)
    assert list(cfg.logger) == ["csv", "tensorboard", "mlflow", "wandb"]
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    import wandb

    wandb.finish()  # flush the offline run's records to disk
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def _metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_record_fields_split_numbers_from_text() -> None:
    numbers, texts = record_fields({"test_acc": 0.5, "epochs": 2, "status": "completed", "x": None, "match": True})  # fmt: skip
    assert numbers == {"test_acc": 0.5, "epochs": 2.0}
    assert texts == {"status": "completed", "match": "True"}


def test_csv_logger_writes_its_metrics(logged_run: tuple[Path, dict]) -> None:
    run_dir, _ = logged_run
    assert "val/acc" in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]


def test_tensorboard_events_and_hparams(logged_run: tuple[Path, dict]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, summary = logged_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    rows = _metrics_csv(run_dir)
    val_acc = [e.value for e in acc.Scalars("val/acc")]
    assert val_acc == pytest.approx([float(r["val_acc"]) for r in rows], abs=1e-6)
    assert acc.Scalars(PREFIX + "test_acc")[-1].value == pytest.approx(
        summary["test_acc"], abs=1e-6
    )
    assert PREFIX + "val_acc_best" in scalars

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    hp = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    assert hp["summary/status"] == "completed"
    assert hp["summary/model"] == "moe" and hp["summary/data"] == "mnist1d"
    assert hp["config/seed"] == 0 and hp["config/trainer/max_epochs"] == 2
    assert hp["params"] == summary["params"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]
    ).experiment
    metric_names = {m.name.tag for m in experiment.metric_infos}
    assert {PREFIX + "test_acc", PREFIX + "val_acc_best", PREFIX + "wall_time_s"} <= metric_names


def test_mlflow_params_metrics_and_record(logged_run: tuple[Path, dict]) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, summary = logged_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "adhoc"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "moe-seed0"
    params = run.data.params
    assert params["config/seed"] == "0" and params["config/data/batch_size"] == "32"
    assert params["params"] == str(summary["params"])
    history = client.get_metric_history(run.info.run_id, "val/acc")
    rows = _metrics_csv(run_dir)
    assert [m.value for m in history] == pytest.approx([float(r["val_acc"]) for r in rows])
    metrics = run.data.metrics
    for name in ("test_acc", "val_acc_best", "val_acc_last", "params", "epochs", "wall_time_s"):
        assert metrics[PREFIX + name] == pytest.approx(summary[name]), name
    tags = run.data.tags
    assert tags[PREFIX + "status"] == "completed" and tags[PREFIX + "model"] == "moe"
    assert tags["model"] == "moe" and tags["seed"] == "0"


def test_wandb_records_hold_config_history_and_final_record(logged_run: tuple[Path, dict]) -> None:
    run_dir, summary = logged_run
    (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = settled_records(log_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == summary["wandb_id"] and run.run_group == "adhoc"
    config = {
        _key(item): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["config"]["seed"] == 0, config.keys()
    val_acc = [
        json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
        if _key(item) == "val/acc"
    ]
    assert val_acc == pytest.approx([float(r["val_acc"]) for r in _metrics_csv(run_dir)])
    final = {
        _key(item): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert "summary" in kinds, kinds
    assert final[PREFIX + "status"] == "completed", sorted(final)
    assert final[PREFIX + "test_acc"] == pytest.approx(summary["test_acc"])
    assert final[PREFIX + "val_acc_best"] == pytest.approx(summary["val_acc_best"])
    assert final[PREFIX + "epochs"] == 2 and isinstance(final[PREFIX + "epochs"], int)
