"""A run's record is right or refused: signals, resume (refused, moved, longer), bad data and a
full disk. Each test reproduces a failure the old code had and shows what happens now."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_env, compose_train, run_module
from moe_lab.config import ResumeRefused
from moe_lab.train import train

TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
    "logger=csv",
]


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> its sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def cli(run_dir: Path, data_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "moe_lab.train", *overrides,
        f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


# -- refused resumes leave the run dir as it was -----------------------------------------------


def test_refused_resume_in_process_changes_nothing(tmp_path: Path, data_dir: Path) -> None:
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    base = ["data=digits", "model=moe", "scheduler=cosine", "scheduler_interval=epoch", *TINY]
    cfg = compose_train(base, run_dir, data_dir)
    assert train(cfg)["status"] == "completed"
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra records (unresolved)
    before = tree_hash(run_dir)
    for change, reason in [
        ("model=cnn", "started with different model"),
        ("trainer.max_epochs=3", "scheduler.T_max: 1 -> 3"),
    ]:
        again = compose_train([*base, change, f"resume={run_dir}"], run_dir, data_dir)
        with pytest.raises(ResumeRefused, match=reason):
            train(again)
        assert tree_hash(run_dir) == before


@pytest.mark.slow
def test_refused_resumes_leave_the_run_dir_byte_for_byte(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    # the cosine schedule is planned over trainer.max_epochs (T_max=${trainer.max_epochs})
    base = ["data=digits", "model=moe", "scheduler=cosine", "scheduler_interval=epoch", *TINY]
    done = run_module(*cli(run_dir, data_dir, *base)[2:], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert summary_of(run_dir)["status"] == "completed"
    before = tree_hash(run_dir)

    other_model = run_module(
        *cli(run_dir, data_dir, *base, "model=cnn", f"resume={run_dir}")[2:], cwd=tmp_path
    )
    assert other_model.returncode == 2
    assert "resume refused" in other_model.stderr and "different model" in other_model.stderr
    assert tree_hash(run_dir) == before

    # the old check compared the unresolved ${trainer.max_epochs} and restarted the schedule
    longer = run_module(
        *cli(run_dir, data_dir, *base, "trainer.max_epochs=3", f"resume={run_dir}")[2:],
        cwd=tmp_path,
    )
    assert longer.returncode == 2
    assert "planned over trainer.max_epochs=1" in longer.stderr
    assert "scheduler.T_max: 1 -> 3" in longer.stderr
    assert tree_hash(run_dir) == before
    assert (
        summary_of(run_dir)["status"] == "completed" and summary_of(run_dir)["test_acc"] is not None
    )


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_resume_from_a_damaged_checkpoint_is_refused(
    tmp_path: Path, data_dir: Path, damage: str
) -> None:
    run_dir = tmp_path / "run"
    overrides = ["data=digits", "model=cnn", *TINY]
    assert train(compose_train(overrides, run_dir, data_dir))["status"] == "completed"
    last = run_dir / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        last.unlink()
    before = tree_hash(run_dir)
    again = compose_train([*overrides, f"resume={run_dir}"], run_dir, data_dir)
    with pytest.raises(
        ResumeRefused, match="unreadable" if damage == "truncated" else "does not exist"
    ):
        train(again)
    assert tree_hash(run_dir) == before
    assert summary_of(run_dir)["status"] == "completed"


# -- a moved run dir keeps its best checkpoint ---------------------------------------------------

# a learning rate at which validation accuracy drops in the second epoch, so that the best
# checkpoint (epoch 0) is not the last one
MOVED = [
    "data=digits", "model=cnn", "data.val_split=0.2", "optimizer.lr=0.1",
    "+trainer.limit_train_batches=6", "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2", "trainer.accelerator=cpu", "logger=none",
]  # fmt: skip


@pytest.mark.parametrize(
    "checkpoint",
    ["moe_lab.lit.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.ModelCheckpoint"],
    ids=["moe_lab", "lightning"],
)
def test_moved_run_dir_resumes_with_its_best_checkpoint(
    tmp_path: Path, data_dir: Path, checkpoint: str
) -> None:
    target = [f"callbacks.model_checkpoint._target_={checkpoint}"]
    reference = tmp_path / "reference"
    ref = train(compose_train([*MOVED, *target, "trainer.max_epochs=2"], reference, data_dir))
    val = [float(r["val_acc"]) for r in csv_rows(reference / "metrics.csv")]
    assert val[1] < val[0], f"the setting no longer has a worse second epoch: {val}"
    assert torch.load(reference / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0

    first_dir, moved = tmp_path / "first", tmp_path / "moved"
    first = train(compose_train([*MOVED, *target, "trainer.max_epochs=1"], first_dir, data_dir))
    shutil.move(first_dir, moved)
    # leftovers of writes killed half-way, which a resume removes
    (moved / "checkpoints" / ".last.ckpt.x1y2.tmp").write_bytes(b"half")
    (moved / ".summary.json.x1y2.tmp").write_text("{")
    resumed = train(
        compose_train([*MOVED, *target, "trainer.max_epochs=2", f"resume={moved}"], moved, data_dir)
    )
    assert resumed["status"] == "completed"
    best_epoch = torch.load(moved / "checkpoints" / "best.ckpt", weights_only=True)["epoch"]
    if checkpoint.startswith("lightning"):
        # Lightning drops best_model_score when the dir changed: the worse epoch 1 became "best"
        assert best_epoch == 1
        return
    assert best_epoch == 0
    assert resumed["test_acc"] == ref["test_acc"]
    assert resumed["val_acc_best"] == ref["val_acc_best"] and resumed["epochs"] == 2
    assert resumed["segments"] == 2 and resumed["wall_time_s"] > first["wall_time_s"]
    assert not list(moved.rglob("*.tmp"))


@pytest.mark.parametrize(
    "logger", ["moe_lab.lit.callbacks.CSVLogger", "lightning.pytorch.loggers.CSVLogger"],
    ids=["moe_lab", "lightning"],
)  # fmt: skip
def test_lightning_csv_history_survives_a_resume(
    tmp_path: Path, data_dir: Path, logger: str
) -> None:
    """Lightning's CSVLogger deletes ``csv/metrics.csv`` when a resumed run starts it again."""
    run_dir = tmp_path / "run"
    # logger=csv; the Keras decay, so the run may be resumed for longer
    overrides = ["data=digits", "model=cnn", *TINY, f"logger.csv._target_={logger}"]
    assert train(compose_train(overrides, run_dir, data_dir))["status"] == "completed"
    resumed = compose_train(
        [*overrides, "trainer.max_epochs=2", f"resume={run_dir}"], run_dir, data_dir
    )
    assert train(resumed)["status"] == "completed"
    rows = csv_rows(run_dir / "csv" / "metrics.csv")
    if logger.startswith("lightning"):
        assert [r["epoch"] for r in rows if r.get("val/acc")] == ["1"]  # epoch 0 was lost
        return
    assert [r["epoch"] for r in rows if r.get("val/acc")] == ["0", "1"]
    ours = csv_rows(run_dir / "metrics.csv")
    assert [float(r["val/acc"]) for r in rows if r.get("val/acc")] == pytest.approx(
        [float(r["val_acc"]) for r in ours]
    )


# -- signals ------------------------------------------------------------------------------------

# digits at batch 8: ~180 steps per epoch, long enough to be signalled in the middle of one
SLOW = [
    "data=digits", "model=moe", "data.batch_size=8", "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
]  # fmt: skip


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the process ended first: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def metrics_epochs(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    return len(csv_rows(path)) if path.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_records_interrupted_and_resume_finishes(
    tmp_path: Path, data_dir: Path, signum: int
) -> None:
    run_dir = tmp_path / "run"
    args = cli(run_dir, data_dir, *SLOW, "logger=default")  # CSV + W&B (offline)
    proc = start(args, tmp_path)
    try:
        wait_for(lambda: metrics_epochs(run_dir) >= 1, proc)
        time.sleep(0.3)  # into the second epoch
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted", summary
    assert summary["epochs"] == 1 and f"resume={run_dir}" in summary["error_message"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    first_wall = summary["wall_time_s"]

    resumed = run_module(*args[2:], f"resume={run_dir}", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = summary_of(run_dir)
    assert summary["status"] == "completed" and summary["epochs"] == 2
    assert summary["segments"] == 2 and summary["wall_time_s"] > first_wall
    # Lightning's CSV keeps the epoch from before the signal, once
    epochs = [r["epoch"] for r in csv_rows(run_dir / "csv" / "metrics.csv") if r.get("val/acc")]
    assert epochs == ["0", "1"]
    # the W&B run continues: same id, the first segment's epoch in its own file
    from wandb_records import read_run

    runs = [read_run(p) for p in sorted((run_dir / "wandb").glob("offline-run-*"))]
    assert len(runs) == 2 and {r.run_id for r in runs} == {summary["wandb_id"]}
    assert runs[0].exit_code != 0 and runs[0].summary["summary/status"] == "interrupted"
    assert [h["epoch"] for r in runs for h in r.history if "val/acc" in h] == [0, 1]


@pytest.mark.slow
def test_sigkill_leaves_status_running_and_resume_sums_the_segments(
    tmp_path: Path, data_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    args = cli(run_dir, data_dir, *SLOW, "logger=csv")
    proc = start(args, tmp_path)
    try:
        wait_for(lambda: metrics_epochs(run_dir) >= 1, proc)
        time.sleep(0.3)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = summary_of(run_dir)
    # nothing can record a SIGKILL: the record says how far the run got, and the report calls it
    # partial
    assert summary["status"] == "running" and summary["epochs"] == 1
    first_wall = summary["wall_time_s"]
    assert first_wall > 0
    resumed = run_module(*args[2:], f"resume={run_dir}", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = summary_of(run_dir)
    assert summary["status"] == "completed" and summary["segments"] == 2
    assert summary["wall_time_s"] > first_wall


def sweep_summaries(sweep_dir: Path) -> dict[str, str]:
    return {p.parent.name: summary_of(p.parent)["status"] for p in sweep_dir.glob("*/summary.json")}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_sigterm_stops_a_sweep(tmp_path: Path, data_dir: Path, launcher: str) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [
        sys.executable, "-m", "moe_lab.train", "-m", *SLOW, "logger=csv", "seed=0,1,2,3",
        f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}", f"paths.data_dir={data_dir}",
    ]  # fmt: skip
    proc = start(args, tmp_path)
    try:
        if launcher == "basic":
            # between jobs, or as the second one starts: the first job has just completed
            wait_for(lambda: "completed" in sweep_summaries(sweep_dir).values(), proc, 600)
        else:
            # mid-job: both workers are training
            wait_for(lambda: sum(metrics_epochs(p) for p in sweep_dir.glob("*")) >= 1, proc, 600)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the sweep stops where it is and exits 128 + 15: with the basic launcher the job's process at
    # once; under joblib after the report is written (a stop is not a failure of the jobs)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    statuses = sweep_summaries(sweep_dir)
    assert "running" not in statuses.values(), statuses
    assert set(statuses.values()) <= {"completed", "interrupted"}
    # jobs the signal kept from starting leave nothing: the report lists them as missing
    assert len(statuses) < 4
    assert len(
        [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    ) == len(statuses)
    if launcher == "joblib":
        assert list(statuses.values()).count("interrupted") >= 1


# -- bad data fails at load, naming the file and the split --------------------------------------


@pytest.fixture
def mnist1d_cache(tmp_path: Path, data_dir: Path) -> Path:
    """A private copy of the generated MNIST-1D cache, to corrupt."""
    from moe_lab.data import MNIST1DDataModule

    shared = MNIST1DDataModule(data_dir)
    shared.prepare_data()
    mine = tmp_path / "data"
    (mine / "mnist1d").mkdir(parents=True)
    shutil.copy(shared.cache_path, mine / "mnist1d" / "mnist1d.npz")
    return mine


def corrupt(path: Path, key: str, index: tuple, value: float) -> None:
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays[key][index] = value
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("key", "index", "value", "split", "problem"),
    [
        (
            "test_x",
            (3, 7),
            np.nan,
            "test",
            "1 NaN and 0 infinite values in 1 samples (first: sample 3)",
        ),
        ("train_x", (11, 0), np.inf, "train", "0 NaN and 1 infinite values"),
        ("train_y", (5,), 10, "train", "labels span 0..10, outside 0..9"),
        ("test_y", (0,), -1, "test", "labels span -1..9"),
    ],
)
def test_bad_values_in_a_cached_split_fail_at_load(
    mnist1d_cache: Path,
    tmp_path: Path,
    key: str,
    index: tuple,
    value: float,
    split: str,
    problem: str,
) -> None:
    cache = mnist1d_cache / "mnist1d" / "mnist1d.npz"
    corrupt(cache, key, index, value)
    run_dir = tmp_path / "run"
    summary = train(compose_train(["data=mnist1d", "model=cnn", *TINY], run_dir, mnist1d_cache))
    assert summary["status"] == "failed" and summary["error_type"] == "ValueError"
    message = summary["error_message"]
    assert f"mnist1d {split} split ({cache})" in message and problem in message
    assert "delete it and the next run regenerates it" in message
    assert summary["epochs"] == 0 and not (run_dir / "checkpoints").exists()


# -- a full disk --------------------------------------------------------------------------------


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.slow
def test_a_full_disk_names_the_path_and_still_writes_the_summary(
    tmp_path: Path, data_dir: Path
) -> None:
    """A real full disk: the run dir is a 192 KiB tmpfs (in a user+mount namespace), which
    holds Hydra's record and summary.json but not the MoE model's first checkpoint."""
    run_dir = tmp_path / "run"
    if not _can_mount_tmpfs(run_dir):
        pytest.skip("cannot mount a tmpfs here (needs unshare -r -m)")
    inner = " ".join(
        [sys.executable, "-m", "moe_lab.train", "data=digits", "model=moe", *TINY,
         f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"]
    )  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c",
         f"mount -t tmpfs -o size=192k tmpfs {run_dir} && {inner}; rc=$?; "
         f"cp {run_dir}/summary.json {tmp_path}/summary.json; exit $rc"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "no space left on device" in errors[0] and str(run_dir / "checkpoints") in errors[0]
    assert "inline_container" not in proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    # a full disk is no result of the run: interrupted, and a resume continues once space is free
    assert summary["status"] == "interrupted" and summary["error_type"] == "OSError"
    assert "no space left on device" in summary["error_message"]
    assert f"resume={run_dir}" in summary["error_message"]


def test_enospc_at_the_checkpoint_write_is_named(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same fault mocked at the write (what torch.save reports as a bare RuntimeError)."""
    import errno

    import moe_lab.utils.io as io

    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{fd}")
        return FullFile(f) if "checkpoints" in path else f

    monkeypatch.setattr(io.os, "fdopen", fdopen)
    run_dir = tmp_path / "run"
    summary = train(compose_train(["data=digits", "model=cnn", *TINY], run_dir, data_dir))
    assert summary["status"] == "interrupted" and summary["error_type"] == "OSError"
    assert summary["error_message"].startswith("no space left on device writing ")
    assert str(run_dir / "checkpoints") in summary["error_message"]
    assert summary_of(run_dir)["status"] == "interrupted"
    assert not list(run_dir.rglob("*.tmp"))


# -- what a result depends on ---------------------------------------------------------------------


def test_the_record_names_device_threads_versions_and_commit(
    tmp_path: Path, data_dir: Path
) -> None:
    import lightning as L

    summary = train(
        compose_train(
            ["data=digits", "model=cnn", "num_threads=1", *TINY], tmp_path / "run", data_dir
        )
    )
    assert summary["status"] == "completed"
    assert summary["device"] == "cpu" and summary["torch_threads"] == 1
    assert summary["torch_version"] == torch.__version__
    assert summary["lightning_version"] == L.__version__
    src = Path(__file__).resolve().parents[1] / "src" / "moe_lab"
    head = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        assert summary["git_commit"] is None
    else:
        assert summary["git_commit"].removesuffix("-dirty") == head.stdout.strip()
