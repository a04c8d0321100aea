"""What a run prints and logs: the end-of-run line, train.log with the config tree and
Lightning's lines, the noise filter, and the progress bar's loss and accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose_train, run_module
from moe_lab.console import config_tree, end_of_run_line

TINY = [
    "data=mnist1d",
    "model=cnn",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.accelerator=cpu",
    "logger=none",
]
TIP = "💡 Tip: For seamless cloud logging"
LEAFSPEC = "isinstance(treespec, LeafSpec)"


def _train_cli(root: Path, data_dir: Path, *extra: str):
    proc = run_module(
        "moe_lab.train", *TINY, f"paths.root_dir={root}", f"paths.data_dir={data_dir}", *extra,
        cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (root / "outputs" / "runs" / "adhoc").iterdir()
    return proc, run_dir


def test_cli_run_ends_with_its_line_and_logs_to_train_log(tmp_path: Path, data_dir: Path) -> None:
    proc, run_dir = _train_cli(tmp_path, data_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    last = proc.stdout.strip().splitlines()[-1]
    assert last == end_of_run_line(summary)
    assert last.startswith("run completed | best val_acc ")
    assert f"best val_acc {100 * summary['val_acc_best']:.2f}%" in last
    assert f"test_acc {100 * summary['test_acc']:.2f}%" in last and last.endswith(str(run_dir))

    log = (run_dir / "train.log").read_text()
    assert "[moe_lab.config][INFO] - resolved config of" in log
    assert f"output_dir: {run_dir}" in log and "max_epochs: 1" in log  # resolved, not ${...}
    assert "GPU available" in log  # Lightning's own lines reach the file
    assert end_of_run_line(summary) in log
    assert "resolved config of" not in proc.stdout  # the tree is in the log, not the terminal

    output = proc.stdout + proc.stderr
    assert TIP not in output and LEAFSPEC not in output


def test_quiet_warnings_off_shows_the_noise(tmp_path: Path, data_dir: Path) -> None:
    proc, run_dir = _train_cli(tmp_path, data_dir, "console.quiet_warnings=false")
    output = proc.stdout + proc.stderr
    assert TIP in output  # the filter, not the environment, removed it above
    assert TIP in (run_dir / "train.log").read_text()


def test_end_of_run_line_of_a_failed_run() -> None:
    line = end_of_run_line(
        {"status": "failed", "error_type": "ConfigError", "epochs": 0, "run_dir": "/r"}
    )
    assert line == "run failed (ConfigError) | best val_acc n/a | test_acc n/a | 0 epochs | /r"


def test_config_tree_is_resolved_yaml_without_rich(tmp_path: Path, data_dir: Path) -> None:
    cfg = compose_train(TINY, tmp_path / "run", data_dir)
    text = config_tree(cfg)
    pytest.importorskip("yaml")
    import yaml

    try:
        import rich  # noqa: F401
    except ImportError:
        parsed = yaml.safe_load(text)
        assert parsed["paths"]["output_dir"] == str(tmp_path / "run")
        assert parsed["trainer"]["max_epochs"] == 1
    else:
        assert "output_dir: " + str(tmp_path / "run") in text


def test_progress_bar_shows_running_loss_and_accuracy(tmp_path: Path, data_dir: Path) -> None:
    from moe_lab.assembly import assemble_run
    from moe_lab.lit.progress import MetricsProgressBar

    cfg = compose_train([*TINY, "trainer.enable_progress_bar=true"], tmp_path / "run", data_dir)
    parts = assemble_run(cfg)
    bar = parts.trainer.progress_bar_callback
    assert isinstance(bar, MetricsProgressBar)
    parts.trainer.fit(parts.module, datamodule=parts.datamodule)
    shown = bar.get_metrics(parts.trainer, parts.module)
    (row,) = parts.module.history  # the epoch's own numbers, computed by the module
    assert shown["loss"] == f"{row['train_loss']:.4f}"
    assert shown["acc"] == f"{100 * row['train_acc']:.1f}%"
    assert shown["val_acc"] == f"{100 * row['val_acc']:.1f}%"

    # where the trainer shows no bar (sweeps, CI) none is added
    quiet = assemble_run(cfg, enable_progress_bar=False)
    assert quiet.trainer.progress_bar_callback is None
