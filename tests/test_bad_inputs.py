"""A table of bad inputs: each gets a clear error, where it enters, naming the problem and its fix.

The README's "Errors you may see" section is this table in prose.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_train
from moe_lab.analysis import load_runs, write_report
from moe_lab.config import ResumeRefused
from moe_lab.layers import Conv1dMoE, Conv2dMoE, DenseMoE
from moe_lab.train import train
from moe_lab.utils.io import atomic_write

Outcome = tuple[str, str]  # (error type name, message)


def raised(fn: Callable[[], object]) -> Outcome:
    try:
        fn()
    except Exception as err:  # the table asserts the type by name
        return type(err).__name__, str(err)
    raise AssertionError("no error raised")


def dense(**kw) -> DenseMoE:
    return DenseMoE(4, 3, 2, **kw)


def conv(**kw) -> Conv2dMoE:
    return Conv2dMoE(3, 8, 2, 3, (8, 8), **kw)


LAYER_CASES: list[tuple[str, Callable[[], object], str, str]] = [
    (
        "n_experts=0",
        lambda: DenseMoE(4, 3, 0),
        "ValueError",
        "n_experts must be a positive integer, got 0",
    ),
    (
        "n_experts=-2 conv",
        lambda: Conv1dMoE(2, 3, -2, 3, 10),
        "ValueError",
        "n_experts must be a positive integer",
    ),
    (
        "unknown activation",
        lambda: dense(expert_activation="relux"),
        "ValueError",
        "unknown activation 'relux'",
    ),
    (
        "unknown regularizer",
        lambda: dense(gating_kernel_regularizer="l3"),
        "ValueError",
        "unknown regularizer 'l3'",
    ),
    (
        "unknown constraint",
        lambda: dense(expert_kernel_constraint="max_nrm"),
        "ValueError",
        "unknown constraint",
    ),
    ("unknown padding", lambda: conv(padding="full"), "ValueError", "unknown mode 'full'"),
    ("causal padding in 2D", lambda: conv(padding="causal"), "ValueError", "only defined for 1D"),
    (
        "kernel_size=0",
        lambda: Conv2dMoE(3, 8, 2, 0, (8, 8)),
        "ValueError",
        "kernel_size entries must be positive",
    ),
    (
        "out_channels=0",
        lambda: Conv2dMoE(3, 0, 2, 3, (8, 8)),
        "ValueError",
        "out_channels must be a positive integer",
    ),
    (
        "input too small for kernel",
        lambda: Conv2dMoE(3, 8, 2, 5, (3, 3)),
        "ValueError",
        "too small for kernel_size",
    ),
    (
        "dense wrong feature count",
        lambda: dense()(torch.randn(2, 5)),
        "ValueError",
        "expected input of shape (*, 4)",
    ),
    ("conv wrong rank", lambda: conv()(torch.randn(3, 8, 8)), "ValueError", "expected a 4D input"),
    (
        "conv wrong channels",
        lambda: conv()(torch.randn(2, 4, 8, 8)),
        "ValueError",
        "expected 3 input channels",
    ),
    (
        "conv wrong spatial size",
        lambda: conv()(torch.randn(2, 3, 9, 9)),
        "ValueError",
        "expected spatial size (8, 8)",
    ),
    (
        "integer input",
        lambda: dense()(torch.ones(2, 4, dtype=torch.long)),
        "ValueError",
        "floating-point input",
    ),
    (
        "float64 input, float32 layer",
        lambda: dense()(torch.randn(2, 4, dtype=torch.float64)),
        "ValueError",
        "float32 weights",
    ),
]


@pytest.mark.parametrize(
    ("case", "fn", "error", "message"), LAYER_CASES, ids=[c[0] for c in LAYER_CASES]
)
def test_layer_inputs(case: str, fn: Callable[[], object], error: str, message: str) -> None:
    got_type, got_message = raised(fn)
    assert got_type == error
    assert message in got_message


TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "logger=none",
]
TOO_DEEP = "data.topology.blocks.0.pool=8"  # 8x8 digits pooled to 1x1 before the second block

CONFIG_CASES = [
    (
        "unknown key",
        ["trainer.max_epoch=3"],
        "ConfigCompositionException",
        "Could not override 'trainer.max_epoch'",
    ),
    (
        "unknown group option",
        ["model=transformer"],
        "MissingConfigException",
        "Could not find 'model/transformer'",
    ),
    (
        "max_epochs=0",
        ["trainer.max_epochs=0"],
        "ConfigError",
        "trainer.max_epochs=0 is invalid: expected a positive integer",
    ),
    (
        "seed of the wrong type",
        ["seed=abc"],
        "ConfigError",
        "seed='abc' is invalid: expected an integer",
    ),
    ("n_experts=0", ["experts.n_experts=0"], "ConfigError", "experts.n_experts=0 is invalid"),
    (
        "val_split=1.5",
        ["data.val_split=1.5"],
        "ConfigError",
        "data.val_split=1.5 is invalid: expected a fraction in [0, 1)",
    ),
    (
        "negative learning rate",
        ["optimizer.lr=-1"],
        "ConfigError",
        "optimizer.lr=-1 is invalid: expected a positive number",
    ),
    (
        "batch size of the wrong type",
        ["data.batch_size=big"],
        "ConfigError",
        "data.batch_size='big' is invalid",
    ),
    (
        "topology too deep for the input",
        [TOO_DEEP],
        "ValueError",
        "topology too deep for input shape (1, 8, 8)",
    ),
    (
        "resume from a missing dir",
        ["resume=/nonexistent/run"],
        "ConfigError",
        "resume=/nonexistent/run: no such run dir",
    ),
    (
        "unknown activation name",
        ["activation.expert=relux"],
        "ValueError",
        "unknown activation 'relux'",
    ),
]


@pytest.mark.parametrize(
    ("case", "overrides", "error", "message"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES]
)
def test_config_overrides(
    tmp_path: Path, data_dir: Path, case: str, overrides: list[str], error: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    try:
        cfg = compose_train(["data=digits", "model=moe", *TINY, *overrides], run_dir, data_dir)
    except Exception as err:  # composition errors come from Hydra, before any run dir exists
        got_type, got_message = type(err).__name__, str(err)
        assert not run_dir.exists()
    else:
        try:
            summary = train(cfg)
        except ResumeRefused as err:  # a refused resume writes nothing at all
            got_type, got_message = "ConfigError", str(err)
            assert not (run_dir / "summary.json").exists()
        else:
            assert summary["status"] == "failed" and summary["epochs"] == 0
            got_type, got_message = summary["error_type"], summary["error_message"]
        assert not (run_dir / "checkpoints").exists()  # failed before any training
    assert got_type == error
    assert message in got_message
    if error == "MissingConfigException":
        assert "cnn_matched" in got_message  # it lists the valid choices


def data_case(kind: str, tmp_path: Path) -> Outcome:
    from moe_lab.data import CIFAR10DataModule, DigitsDataModule, MNIST1DDataModule, MNISTDataModule

    if kind == "missing dataset":
        return raised(lambda: CIFAR10DataModule(str(tmp_path)).setup())
    if kind == "name escaping the data dir":
        return raised(lambda: DigitsDataModule(str(tmp_path), name="../outside"))
    if kind == "unwritable data dir":
        blocker = tmp_path / "file"
        blocker.write_text("not a dir")
        return raised(lambda: MNIST1DDataModule(str(blocker)).prepare_data())
    if kind == "truncated file":
        from test_data_vision import fake_mnist

        arrays = fake_mnist(tmp_path, "MNIST")
        assert arrays
        path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:100])
        return raised(lambda: MNISTDataModule(str(tmp_path)).setup())
    if kind == "corrupt cache":
        (tmp_path / "mnist1d").mkdir()
        datamodule = MNIST1DDataModule(str(tmp_path))
        datamodule.prepare_data()
        caches = [p for p in (tmp_path / "mnist1d").iterdir() if p.is_file()]
        caches[0].write_bytes(b"garbage")
        x, _ = MNIST1DDataModule(str(tmp_path)).split("train")  # regenerated (and logged)
        return "rebuilt", f"{tuple(x.shape)}"
    if kind == "batch_size=0":
        return raised(lambda: DigitsDataModule(str(tmp_path), batch_size=0))
    raise AssertionError(kind)


DATA_CASES = [
    ("missing dataset", "FileNotFoundError", "data.download=true"),
    ("name escaping the data dir", "ValueError", "must not be absolute or contain '..'"),
    ("unwritable data dir", "ValueError", "is not a writable directory"),
    ("truncated file", "ValueError", "are corrupt or truncated"),
    ("corrupt cache", "rebuilt", "(4000, 1, 40)"),
    ("batch_size=0", "ValueError", "batch_size must be a positive int, got 0"),
]


@pytest.mark.parametrize(("case", "error", "message"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_inputs(tmp_path: Path, case: str, error: str, message: str) -> None:
    got_type, got_message = data_case(case, tmp_path)
    assert got_type == error
    assert message in got_message


def write_run(job: Path, **fields) -> None:
    job.mkdir(parents=True)
    summary = {
        "model": "cnn", "data": "digits", "n_experts": None, "seed": 0, "params": 10, "status": "completed",
        "epochs": 1, "val_acc_last": 0.5, "val_acc_best": 0.5, "test_acc": 0.5, "wall_time_s": 1.0,
    }  # fmt: skip
    summary.update(fields)
    (job / "summary.json").write_text(json.dumps(summary))


def report_cli(sweep: Path) -> Outcome:
    """``python -m moe_lab.report SWEEP``: one line on stderr and exit code 2, no traceback."""
    from moe_lab.report import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main([str(sweep)])
        except SystemExit as exit_:
            code = exit_.code
    return f"exit {code}", stderr.getvalue()


def report_case(kind: str, sweep: Path) -> Outcome:
    if kind == "missing dir":
        return raised(lambda: write_report(sweep / "nope"))
    sweep.mkdir()
    if kind == "empty sweep":
        return raised(lambda: write_report(sweep))
    if kind == "summary with missing fields":
        (sweep / "0").mkdir()
        (sweep / "0" / "summary.json").write_text(json.dumps({"model": "cnn"}))
        write_run(sweep / "1")
        with pytest.warns(UserWarning) as warned:
            runs = load_runs(sweep)
        assert sorted(runs["status"]) == ["completed", "invalid"]
        return "warning", str(warned[0].message)
    if kind == "partial run":
        (sweep / "0").mkdir()
        (sweep / "0" / "metrics.csv").write_text("epoch,val_acc\n0,0.4\n")
        write_run(sweep / "1")
        runs = load_runs(sweep)
        row = runs[runs["status"] != "completed"].iloc[0]
        return str(row["status"]), str(row["detail"])
    if kind == "only failed runs":
        write_run(sweep / "0", status="failed", error_type="RuntimeError", error_message="boom")
        return report_cli(sweep)
    raise AssertionError(kind)


REPORT_CASES = [
    ("missing dir", "FileNotFoundError", "does not exist"),
    ("empty sweep", "ValueError", "no runs found"),
    ("summary with missing fields", "warning", "missing fields"),
    ("partial run", "partial", "no summary.json"),
    ("only failed runs", "exit 2", "none of the 1 runs completed"),
]


@pytest.mark.parametrize(
    ("case", "error", "message"), REPORT_CASES, ids=[c[0] for c in REPORT_CASES]
)
def test_report_inputs(tmp_path: Path, case: str, error: str, message: str) -> None:
    got_type, got_message = report_case(case, tmp_path / "sweep")
    assert got_type == error
    assert message in got_message


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old")

    def crash(f) -> None:
        f.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_the_table_has_at_least_thirty_cases() -> None:
    assert len(LAYER_CASES) + len(CONFIG_CASES) + len(DATA_CASES) + len(REPORT_CASES) >= 30
    assert np.all([len(c) == 4 for c in LAYER_CASES])
