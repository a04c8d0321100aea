"""W&B: one run per job, in its own dir, with its own id, name, config, tags, history and summary,
read back from the offline ``.wandb`` files with wandb's own record definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose_train, run_module
from moe_lab.train import train
from wandb_records import read_run

TINY_SWEEP = [
    "-m",
    "experiment=mnist1d",
    "model=moe",
    "optimizer.lr=0.001,0.003",
    "seed=0",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
]


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/summary.json"))


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])
def test_each_job_of_a_sweep_has_its_own_wandb_run(
    tmp_path: Path, data_dir: Path, launcher: str
) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_module(
        "moe_lab.train",
        *TINY_SWEEP,
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.data_dir={data_dir}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already in progress" not in proc.stdout + proc.stderr
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 2
    ids = set()
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        (offline,) = (job / "wandb").glob("offline-run-*")  # its own dir, exactly one run
        run = read_run(offline)
        assert run.run_id == summary["wandb_id"] and run.run_id in offline.name
        ids.add(run.run_id)
        lr = summary["overrides"][
            [o.split("=")[0] for o in summary["overrides"]].index("optimizer.lr")
        ]
        lr = float(lr.split("=")[1])
        # its own config: this job's learning rate and seed, not another job's
        assert run.config["config"]["optimizer"]["lr"] == lr
        assert run.config["config"]["seed"] == 0
        assert run.config["params"] == summary["params"]
        # the W&B name is the report group's label (moe_lab.run.labels) and the seed
        assert run.name == f"moe K=2 optimizer.lr={lr} seed=0"
        assert run.group == f"mnist1d/{sweep_dir.name}"
        assert "seed=0" in run.tags and "model=moe" in run.tags
        # its own history: one epoch of this job, steps from 0
        epochs = [h for h in run.history if "val/acc" in h]
        assert len(epochs) == 1
        assert epochs[0]["val/acc"] == pytest.approx(summary["val_acc_last"])
        assert [h["_step"] for h in run.history] == list(range(len(run.history)))
        # the record's final fields, and a clean exit
        for key in ("status", "test_acc", "val_acc_best", "params", "wall_time_s", "epochs"):
            assert run.summary[f"summary/{key}"] == summary[key], key
        assert run.summary["summary/status"] == "completed" and run.exit_code == 0
    assert len(ids) == 2


def test_a_diverged_run_finishes_its_wandb_run_as_failed(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    # a learning rate that diverges at once: the run ends "diverged"
    overrides = [
        "data=digits", "model=moe", "optimizer=sgd", "optimizer.lr=1e12", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3", "trainer.accelerator=cpu", "logger=default",
    ]  # fmt: skip
    summary = train(compose_train(overrides, run_dir, data_dir))
    assert summary["status"] == "diverged"
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    run = read_run(offline)
    assert run.exit_code == 1  # W&B shows it failed
    assert run.summary["summary/status"] == "diverged"
    assert run.summary["summary/error_type"] == "DivergedError"
    assert run.run_id == summary["wandb_id"]
    # a single run is named by all its overrides but where it runs, what it logs and what the
    # label's own fields say (model, data, seed)
    assert run.name == (
        "moe K=2 optimizer=sgd optimizer.lr=1000000000000.0 trainer.max_epochs=1 "
        "trainer.limit_train_batches=3 trainer.accelerator=cpu seed=0"
    )
    assert run.group == "adhoc"
    # and the next run of this process gets a W&B run of its own
    again = train(compose_train(overrides, tmp_path / "again", data_dir))
    assert again["wandb_id"] != summary["wandb_id"]
