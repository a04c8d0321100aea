"""End-to-end training runs: every dataset x {cnn, moe}, logging, checkpoints, resume, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_train, run_module
from moe_lab.run.record import SUMMARY_FIELDS, read_predictions
from moe_lab.train import train

TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.accelerator=cpu",
    "logger=none",
]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model", ["cnn", "moe"])
@pytest.mark.parametrize("data", ["mnist1d", "digits", "moving_digits"])
def test_tiny_run_on_offline_data(tmp_path: Path, data_dir: Path, data: str, model: str) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train([f"data={data}", f"model={model}", *TINY], run_dir, data_dir)
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert set(SUMMARY_FIELDS) <= set(on_disk)
    assert on_disk["model"] == model and on_disk["data"] == data
    assert on_disk["n_experts"] == (2 if model == "moe" else None)
    assert on_disk["epochs"] == 1 and 0.0 <= on_disk["test_acc"] <= 1.0
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["0"]
    assert float(rows[0]["val_acc"]) == pytest.approx(on_disk["val_acc_last"])
    gate_cols = [c for c in rows[0] if c.startswith("gate/")]
    if model == "moe":
        importance = [c for c in gate_cols if "/importance_" in c]
        assert importance and any(c.endswith("/entropy") for c in gate_cols)
        # softmax gates: the mean gates of one layer sum to 1
        layer = importance[0].rsplit("/", 1)[0]
        total = sum(float(rows[0][c]) for c in importance if c.startswith(layer + "/"))
        assert total == pytest.approx(1.0, abs=1e-5)
    else:
        assert gate_cols == []
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    # each test example's prediction: its accuracy is the recorded test accuracy
    pred, label = read_predictions(run_dir)
    assert pred.dtype == label.dtype == np.int16 and pred.shape == label.shape
    assert float((pred == label).mean()) == pytest.approx(on_disk["test_acc"], abs=1e-6)


def test_wandb_offline_run_writes_real_files(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if o != "logger=none"] + [
        "data=digits",
        "model=moe",
        "logger=default",
    ]
    cfg = compose_train(overrides, run_dir, data_dir)
    assert cfg.logger.wandb.offline is True  # WANDB_MODE is not "online" in tests
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    records = list(runs[0].glob("run-*.wandb"))
    assert records and records[0].stat().st_size > 0
    assert summary["wandb_id"] and summary["wandb_id"] in runs[0].name
    assert (run_dir / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is invalid: expected a positive integer"),
        ("seed=abc", "seed='abc' is invalid: expected an integer"),
        ("experts.n_experts=0", "experts.n_experts=0 is invalid"),
        ("data.val_split=1.5", "data.val_split=1.5 is invalid: expected a fraction"),
    ],
)
def test_bad_values_fail_before_training(
    tmp_path: Path, data_dir: Path, override: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train(["data=digits", "model=moe", *TINY, override], run_dir, data_dir)
    summary = train(cfg)
    assert summary["status"] == "failed"
    assert summary["error_type"] == "ConfigError"
    assert message in summary["error_message"]
    assert summary["epochs"] == 0
    assert not (run_dir / "checkpoints").exists()


def test_cli_errors_name_the_key_and_the_choices(tmp_path: Path, data_dir: Path) -> None:
    common = [f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'out'}"]
    unknown_option = run_module("moe_lab.train", "model=transformer", *common, cwd=tmp_path)
    assert unknown_option.returncode != 0
    assert "model/transformer" in unknown_option.stderr and "cnn_matched" in unknown_option.stderr
    unknown_key = run_module("moe_lab.train", "trainer.max_epoch=3", *common, cwd=tmp_path)
    assert unknown_key.returncode != 0 and "max_epoch" in unknown_key.stderr
    bad_value = run_module(
        "moe_lab.train", "data=digits", "trainer.max_epochs=-1", *common, cwd=tmp_path
    )
    assert bad_value.returncode == 1
    assert "trainer.max_epochs=-1 is invalid" in bad_value.stderr
    assert "Traceback" not in bad_value.stderr


@pytest.mark.parametrize("model", ["cnn", "moe"])
@pytest.mark.parametrize("data", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_tiny_run_on_fake_torchvision_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str, model: str
) -> None:
    from torchvision import datasets

    from test_data_vision import accept_fake_md5s, fake_cifar, fake_mnist

    data_dir = tmp_path / "data"
    if data.startswith("cifar"):
        fake_cifar(data_dir, hundred=data == "cifar100", n_per_file=8, n_test=8)
        accept_fake_md5s(
            monkeypatch, datasets.CIFAR100 if data == "cifar100" else datasets.CIFAR10, data_dir
        )
    else:
        fake_mnist(
            data_dir,
            {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[data],
            n_train=24,
            n_test=8,
        )
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [f"data={data}", f"model={model}", "data.batch_size=8", *TINY], run_dir, data_dir
    )
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    assert summary["data"] == data and summary["epochs"] == 1
    if data == "cifar10":  # the seed's exact parameter counts (SPEC 1.3)
        assert summary["params"] == {"cnn": 1_250_858, "moe": 7_560_140}[model]
    assert read_metrics(run_dir)[0]["epoch"] == "0"


def test_missing_dataset_fails_with_where_and_how(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train(["data=cifar10", "model=cnn", *TINY], run_dir, tmp_path / "empty")
    summary = train(cfg)
    assert summary["status"] == "failed" and summary["error_type"] == "FileNotFoundError"
    assert "cifar-10-batches-py" in summary["error_message"]
    assert "data.download=true" in summary["error_message"]


@pytest.mark.parametrize(
    "options",
    [
        ["channels_last=true"],
        ["trainer.precision=bf16-mixed"],
        ["matmul_precision=high", "trainer.benchmark=true"],
        pytest.param(["compile=true"], marks=pytest.mark.slow),
    ],
    ids=["channels_last", "bf16", "matmul_precision", "compile"],
)
def test_speed_options_train_on_cpu(tmp_path: Path, data_dir: Path, options: list[str]) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train(["data=digits", "model=moe", *TINY, *options], run_dir, data_dir)
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    val_loss = float(read_metrics(run_dir)[0]["val_loss"])
    assert val_loss == val_loss and val_loss < 10  # finite, sane


def test_testing_the_best_checkpoint_keeps_the_whole_history(
    tmp_path: Path, data_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    # a held-out split makes the run test the best-validation checkpoint, usually not the last epoch
    overrides = [
        "data=digits",
        "model=cnn",
        "data.val_split=0.2",
        "optimizer.lr=1e-9",
        "trainer.max_epochs=3",
    ]
    cfg = compose_train([*overrides, *TINY[1:]], run_dir, data_dir)
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    rows = read_metrics(run_dir)
    assert summary["epochs"] == len(rows) == 3
    assert summary["val_acc_last"] == pytest.approx(float(rows[-1]["val_acc"]))
    assert summary["val_acc_best"] == pytest.approx(max(float(r["val_acc"]) for r in rows))
