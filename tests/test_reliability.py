"""Nothing lost on crash, failure or divergence; same seed, same numbers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, compose_train, run_module
from moe_lab.config import ResumeRefused
from moe_lab.train import train

# digits at batch 8: ~180 steps per epoch, long enough to be killed in the middle of one
RUN = [
    "data=digits",
    "model=moe",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "logger=csv",
]


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def train_cli(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moe_lab.train",
        *RUN,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(
    tmp_path: Path, data_dir: Path
) -> None:
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    done = run_module(*train_cli(reference, data_dir)[2:], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(
        train_cli(victim, data_dir),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while len(metrics_rows(victim)) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)  # into the second epoch
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows_at_kill = len(metrics_rows(victim))
    assert rows_at_kill < 2, "the kill came too late to interrupt the run"
    assert not list(victim.rglob("*.tmp")), "a write was left half-done"

    resumed = run_module(
        *train_cli(victim, data_dir, f"resume={victim}")[2:], cwd=tmp_path, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected, got = metrics_rows(reference), metrics_rows(victim)
    assert [r["epoch"] for r in got] == ["0", "1"]  # no lost or duplicated epochs
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert [r[key] for r in got] == [r[key] for r in expected], (key, rows_at_kill)
    ref_summary = json.loads((reference / "summary.json").read_text())
    summary = json.loads((victim / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_acc"] == ref_summary["test_acc"]
    assert summary["val_acc_best"] == ref_summary["val_acc_best"]
    # the original run's Hydra record is kept; the resumed invocation's sits beside it
    assert (victim / ".hydra" / "config.yaml").is_file()
    assert list(victim.glob(".hydra_resume_*/overrides.yaml"))


def test_resume_refuses_a_different_experiment(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            "data=digits",
            "model=cnn",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1",
            "logger=none",
        ],
        run_dir,
        data_dir,
    )
    assert train(cfg)["status"] == "completed"
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(
        "model: {name: cnn}\n"  # a record that differs from what we pass now
    )
    again = compose_train(
        ["data=digits", "model=cnn", "logger=none", f"resume={run_dir}"], run_dir, data_dir
    )
    with pytest.raises(ResumeRefused, match=r"started with different .*model"):
        train(again)
    # the refusal leaves the run's record as it was
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_same_seed_same_numbers(tmp_path: Path, data_dir: Path) -> None:
    overrides = [
        "data=mnist1d",
        "model=moe",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=10",
        "+trainer.limit_val_batches=3",
        "+trainer.limit_test_batches=3",
        "logger=none",
        "seed=3",
    ]
    runs = []
    for name in ("a", "b"):
        cfg = compose_train(overrides, tmp_path / name, data_dir)
        assert train(cfg)["status"] == "completed"
        runs.append(metrics_rows(tmp_path / name))
    strip = [{k: v for k, v in r.items()} for r in runs[0]]
    assert strip == runs[1]


def test_divergence_is_named_with_epoch_and_step(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            "data=digits",
            "model=moe",
            "optimizer=sgd",
            "optimizer.lr=1e12",
            "trainer.max_epochs=2",
            "logger=none",
        ],
        run_dir,
        data_dir,
    )
    summary = train(cfg)
    assert summary["status"] == "diverged", summary
    assert summary["error_type"] == "DivergedError"
    at = summary["diverged_at"]
    assert at["epoch"] == 0 and at["step"] >= 0
    assert "diverged" in summary["error_message"]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "diverged" and on_disk["diverged_at"] == at


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "ddp"
    proc = run_module(
        "moe_lab.train", "data=digits", "model=moe", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
        "logger=csv", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    assert len(metrics_rows(run_dir)) == 1


def test_wandb_key_never_reaches_the_run_dir(tmp_path: Path, data_dir: Path) -> None:
    secret = "fake0key0that0must0never0be0written0anywhere0x"  # 40+ chars, like a real key
    run_dir = tmp_path / "run"
    proc = run_module(
        "moe_lab.train", "data=digits", "model=moe", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "trainer.accelerator=cpu", "logger=default",
        f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", cwd=tmp_path, WANDB_API_KEY=secret,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((run_dir / "wandb").glob("offline-run-*"))
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []
    assert secret not in proc.stdout + proc.stderr
