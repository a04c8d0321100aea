"""A report logged as one W&B run (job_type="report") in its sweep's group, offline, read back
from the run's own files: its records and the logged table's JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from moe_lab.run.trackers import FIGURE_KEY, TABLE_KEY, log_report_run
from wandb_log import record_items, settled_records


def _report_dir(tmp_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = tmp_path / "sweep"
    report.mkdir()
    rows = [
        {"model": "cnn", "seed": 0, "test_acc": 0.71, "status": "completed"},
        {"model": "moe", "seed": 0, "test_acc": 0.74, "status": "completed"},
        {"model": "moe", "seed": 1, "test_acc": "", "status": "failed"},
    ]
    with open(report / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [70, 74])
    fig.savefig(report / "curves.png")
    plt.close(fig)
    (report / "report.md").write_text("# report\n")
    return report


def test_report_run_holds_the_table_and_figures(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    report = _report_dir(tmp_path)
    run_dir = log_report_run(report, group="mnist1d")
    assert run_dir.parent == report / "wandb" and run_dir.name.startswith("offline-run-")
    (log_file,) = run_dir.glob("run-*.wandb")
    records = settled_records(log_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.job_type == "report" and run.run_group == "mnist1d" and run.project == "moe_lab"
    history = record_items(records, "history")
    table = history[TABLE_KEY]
    assert table["_type"] == "table-file" and table["nrows"] == 3
    image = history[FIGURE_KEY.format(stem="curves")]
    assert image["_type"] == "image-file"
    # the table's own file, as wandb wrote it, holds summary.csv's rows
    logged = json.loads((run_dir / "files" / table["path"]).read_text())
    assert logged["columns"] == ["model", "seed", "test_acc", "status"]
    assert logged["data"] == [
        ["cnn", 0, 0.71, "completed"],
        ["moe", 0, 0.74, "completed"],
        ["moe", 1, None, "failed"],
    ]
    assert (run_dir / "files" / image["path"]).is_file()
    assert (run_dir / "files" / "report.md").read_text() == "# report\n"


def test_report_run_needs_a_built_report(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"python -m moe_lab\.report"):
        log_report_run(tmp_path, group="g")


def test_multirun_end_logs_the_report_in_the_jobs_group_only_with_wandb(
    tmp_path: Path, monkeypatch
) -> None:
    from omegaconf import OmegaConf

    from moe_lab.run.trackers import log_report_run_if_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    report = _report_dir(tmp_path)
    without = OmegaConf.create({"experiment_name": "mnist1d", "logger": {"csv": {"_target_": "x"}}})
    assert log_report_run_if_wandb(without, report) is None
    assert not (report / "wandb").exists()
    wandb_node = {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "proj"}
    config = OmegaConf.create({"experiment_name": "mnist1d", "logger": {"wandb": wandb_node}})
    run_dir = log_report_run_if_wandb(config, report)
    (log_file,) = run_dir.glob("run-*.wandb")
    (run,) = [r.run for r in settled_records(log_file) if r.WhichOneof("record_type") == "run"]
    assert (run.job_type, run.run_group, run.project) == ("report", "mnist1d/sweep", "proj")
