"""The debug= presets, each against experiment=mnist1d (a held-out validation split, whose test
scoring normally loads the best checkpoint), and Lightning's fast_dev_run switch given directly."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import compose_train
from moe_lab.train import train


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _run(tmp_path: Path, data_dir: Path, *overrides: str) -> tuple[Path, dict]:
    run_dir = tmp_path / "run"
    cfg = compose_train(["experiment=mnist1d", *overrides], run_dir, data_dir)
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    return run_dir, summary


def test_fast_dev_run_preset(tmp_path: Path, data_dir: Path) -> None:
    run_dir, summary = _run(tmp_path, data_dir, "debug=fast_dev_run")
    assert summary["experiment"] == "debug" and summary["epochs"] == 1
    assert [r["step"] for r in _rows(run_dir)] == ["1"]  # one training batch
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()  # nothing to choose from


def test_fast_dev_run_switch_without_preset(tmp_path: Path, data_dir: Path) -> None:
    # the command line of the issue: it used to fail testing ckpt_path="best"
    _, summary = _run(tmp_path, data_dir, "+trainer.fast_dev_run=true", "logger=csv")
    assert summary["epochs"] == 1 and summary["test_acc"] is not None


def test_limit_preset_runs_fractions_of_each_split(tmp_path: Path, data_dir: Path) -> None:
    run_dir, summary = _run(tmp_path, data_dir, "debug=limit")
    cfg = compose_train(["experiment=mnist1d", "debug=limit"], tmp_path / "probe", data_dir)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    per_epoch = int(len(datamodule.train_dataloader()) * cfg.trainer.limit_train_batches)
    assert per_epoch >= 1
    steps = [int(r["step"]) for r in _rows(run_dir)]
    assert steps == [per_epoch * (e + 1) for e in range(cfg.trainer.max_epochs)]
    assert summary["epochs"] == 3 and (run_dir / "checkpoints" / "best.ckpt").is_file()


def test_overfit_preset_fits_its_few_batches(tmp_path: Path, data_dir: Path) -> None:
    run_dir, _ = _run(tmp_path, data_dir, "debug=overfit", "trainer.max_epochs=10")
    rows = _rows(run_dir)
    assert len(rows) == 10 and [int(r["step"]) for r in rows][:2] == [3, 6]  # 3 batches/epoch
    losses = [float(r["train_loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses)
    # the same 3 batches every epoch: the training loss falls well below its start
    assert losses[-1] < 0.8 * losses[0], losses


def test_profiler_preset_writes_its_report_in_the_run_dir(tmp_path: Path, data_dir: Path) -> None:
    run_dir, _ = _run(tmp_path, data_dir, "debug=profiler", "+trainer.limit_train_batches=3")
    report = (run_dir / "fit-profile.txt").read_text()
    assert "run_training_epoch" in report and "Total" in report


def test_debug_presets_compose_with_every_experiment() -> None:
    from moe_lab.config import CONFIG_DIR, compose_config

    experiments = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    experiments = [e for e in experiments if not e.startswith("_")]
    presets = ("fast_dev_run", "overfit", "limit", "profiler")
    for i, experiment in enumerate(experiments):  # every experiment, every preset at least once
        for preset in {presets[i % 4], presets[(i + 1) % 4]}:
            cfg = compose_config(
                [f"experiment={experiment}", f"debug={preset}"], output_dir="/tmp/x"
            )
            assert cfg.experiment_name == "debug" and cfg.trainer.accelerator == "cpu"
            assert not cfg.logger  # no trackers unless asked for
    cfg = compose_config(["experiment=mnist1d", "debug=limit", "logger=csv"], output_dir="/tmp/x")
    assert list(cfg.logger) == ["csv"]  # the command line's logger wins over the preset's


@pytest.mark.parametrize("experiment", ["digits", "moving_digits"])
def test_limit_fractions_leave_whole_batches_on_small_splits(
    tmp_path: Path, data_dir: Path, experiment: str
) -> None:
    # Lightning refuses a fraction that leaves no whole batch; the smallest held-out splits
    run_dir = tmp_path / "run"
    cfg = compose_train([f"experiment={experiment}", "debug=limit"], run_dir, data_dir)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    datamodule.setup("test")
    for limit, loader in (
        (cfg.trainer.limit_train_batches, datamodule.train_dataloader()),
        (cfg.trainer.limit_val_batches, datamodule.val_dataloader()),
        (cfg.trainer.limit_test_batches, datamodule.test_dataloader()),
    ):
        assert int(len(loader) * limit) >= 1, (experiment, limit, len(loader))
