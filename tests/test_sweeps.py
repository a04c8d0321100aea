"""Multirun sweeps end to end: presets, launchers, failing grid points, the automatic report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import run_module

TINY = [
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.accelerator=cpu",
    "logger=csv",
]


def only_sweep_dir(log_dir: Path, experiment: str) -> Path:
    sweeps = list((log_dir / "multirun" / experiment).iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def summary_rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_mnist1d_preset_sweep_writes_report_and_matches_params(
    tmp_path: Path, data_dir: Path
) -> None:
    log_dir = tmp_path / "out"
    proc = run_module(
        "moe_lab.train", "-m", "experiment=mnist1d", "trainer.max_epochs=1", "seed=0,1", *TINY,
        f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep_dir(log_dir, "mnist1d")
    for name in ("summary.csv", "report.md", "curves.png"):
        assert (sweep / name).is_file(), name
    assert str(sweep / "report.md") in proc.stdout + proc.stderr  # it says where the report is
    rows = summary_rows(sweep)
    assert sorted((r["model"], r["seed"]) for r in rows) == sorted(
        (m, s) for m in ("cnn", "moe", "cnn_flop_matched", "cnn_matched") for s in ("0", "1")
    )
    assert all(r["status"] == "completed" for r in rows)
    moe_params = {int(r["params"]) for r in rows if r["model"] == "moe"}
    matched = {int(r["params"]) for r in rows if r["model"] == "cnn_matched"}
    assert len(moe_params) == 1 and len(matched) == 1
    (target,), (got,) = moe_params, matched
    assert abs(got - target) / target <= 0.01
    moe_flops = {int(r["flops_per_example"]) for r in rows if r["model"] == "moe"}
    flop_matched = {int(r["flops_per_example"]) for r in rows if r["model"] == "cnn_flop_matched"}
    (target,), (got,) = moe_flops, flop_matched
    assert abs(got - target) / target <= 0.01
    # every job has its own dir with its own summary
    job_dirs = {Path(r["run_dir"]) for r in rows}
    assert len(job_dirs) == 8 and all((d / "summary.json").is_file() for d in job_dirs)
    report = (sweep / "report.md").read_text()
    assert "Welch" in report and "cnn_matched" in report


@pytest.mark.slow
def test_joblib_launcher_two_parallel_jobs_and_a_failing_grid_point(
    tmp_path: Path, data_dir: Path
) -> None:
    log_dir = tmp_path / "out"
    proc = run_module(
        "moe_lab.train", "-m", "data=digits", "model=moe", "experts.n_experts=2,0", "trainer.max_epochs=1",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment_name=joblib_test", *TINY,
        f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", cwd=tmp_path,
    )  # fmt: skip
    # the bad grid point fails, the other finishes, and the sweep says so at the end
    assert proc.returncode != 0
    assert "1 of 2 runs did not complete" in proc.stdout + proc.stderr
    sweep = only_sweep_dir(log_dir, "joblib_test")
    rows = {r["n_experts"]: r for r in summary_rows(sweep)}
    assert rows["2"]["status"] == "completed"
    failed = json.loads((Path(rows["0"]["run_dir"]) / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["error_type"] == "ConfigError"
    assert "experts.n_experts=0" in failed["error_message"]
    report = (sweep / "report.md").read_text()
    assert "experts.n_experts=0" in report  # listed with its error, not averaged in


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_slurm"])
def test_launcher_configs_compose(launcher: str) -> None:
    from hydra import compose, initialize_config_dir

    from moe_lab.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(
        {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "submitit_slurm": "SlurmLauncher"}[
            launcher
        ]
    )


@pytest.mark.parametrize(
    "experiment",
    [
        "mnist1d",
        "digits",
        "moving_digits",
        "experts_sweep",
        "routing_mnist1d",
        "seed_cifar10",
        "controlled_cifar10",
    ],
)
def test_experiment_presets_compose(experiment: str) -> None:
    from hydra import compose, initialize_config_dir

    from moe_lab.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.seed == "0,1,2,3"
    assert cfg.experiment_name == experiment
    if experiment == "seed_cifar10":  # the seed demo's protocol, exactly (SPEC 1.3)
        assert params.model == "cnn,moe"
        assert cfg.data.batch_size == 32 and cfg.data.val_split == 0 and cfg.data.augment is True
        assert cfg.trainer.max_epochs == 16 and cfg.experts.n_experts == 2
        assert cfg.optimizer._target_ == "torch.optim.RMSprop"
        assert (cfg.optimizer.lr, cfg.optimizer.alpha) == (1e-4, 0.9)
        assert cfg.scheduler.decay == 1e-6 and cfg.scheduler_interval == "step"
        assert (cfg.activation.expert, cfg.activation.gating) == ("relu", "softmax")
    if experiment == "controlled_cifar10":
        assert params.model == "cnn,moe,cnn_flop_matched,cnn_matched" and cfg.data.val_split > 0
    if experiment == "experts_sweep":
        assert params.experts == "k1,k2,k4,k8"


def test_routing_variants_of_one_k_are_separate_groups(tmp_path: Path) -> None:
    from moe_lab.analysis import load_runs, summarize
    from moe_lab.models import routing_variant as _routing_variant

    assert _routing_variant({"gate_input": "full", "top_k": 1}) is None
    assert (
        _routing_variant({"gate_input": "pooled", "noisy_gating": True})
        == "noisy_gating=True,gate_input=pooled"
    )
    for i, (routing, acc) in enumerate(
        [(None, 0.5), (None, 0.6), ("gate_input=pooled", 0.7), ("gate_input=pooled", 0.8)]
    ):
        job = tmp_path / str(i)
        job.mkdir()
        summary = {
            "model": "moe", "data": "mnist1d", "n_experts": 4, "top_k": None, "routing": routing, "seed": i,
            "params": 10, "status": "completed", "epochs": 1, "val_acc_last": acc, "val_acc_best": acc,
            "test_acc": acc, "wall_time_s": 1.0,
        }  # fmt: skip
        (job / "summary.json").write_text(json.dumps(summary))
    table = summarize(load_runs(tmp_path))
    assert sorted(table["group"]) == ["moe K=4", "moe K=4 gate_input=pooled"]
    assert sorted(table["n"]) == [2, 2]
    by_label = summarize(load_runs(tmp_path), baseline="moe K=4").set_index("group")
    assert bool(by_label.loc["moe K=4", "is_baseline"])
    assert by_label.loc["moe K=4 gate_input=pooled", "baseline_group"] == "moe K=4"
    assert by_label.loc["moe K=4 gate_input=pooled", "diff"] == pytest.approx(0.2)
