"""A sweep's report never misleads and never loses a result.

Each test reproduces a case that used to go wrong: a swept learning rate pooled as seeds, a
sweep and its rerun averaged together, a killed sweep reporting itself complete, one bad job
sinking the whole report, a report half replaced. Synthetic run dirs are written with the run
record's own writer (``RunSummary.to_dict`` + ``atomic_write_json``, as train.py does), and the
planned jobs come from a ``multirun.yaml`` in Hydra's layout; two tests run tiny real sweeps.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import REPO_ROOT, cli_env, run_module
from moe_lab.analysis import load_runs, read_plan, summarize, write_report
from moe_lab.analysis.callbacks import SweepReportCallback
from moe_lab.finish import main as finish_main
from moe_lab.report import main as report_main
from moe_lab.run.record import METRICS_COLUMNS, REQUIRED_FIELDS, SUMMARY_FIELDS, RunSummary
from moe_lab.utils.io import atomic_write_json
from test_analysis import ref_mean_se, ref_welch

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
REPORT_NAMES = ("summary.csv", "report.md", "curves.png", "curves.svg")


def write_multirun_yaml(sweep: Path, task: list[str], params: dict[str, str] | None = None) -> None:
    """The parts of Hydra's ``multirun.yaml`` that say which jobs a sweep runs, in its layout."""
    sweep.mkdir(parents=True, exist_ok=True)
    cfg = {
        "hydra": {
            "sweep": {
                "dir": str(sweep),
                "subdir": "${hydra.job.num}_${hydra.job.override_dirname}",
            },
            "sweeper": {"_target_": BASIC_SWEEPER, "max_batch_size": None, "params": params or {}},
            "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
            "overrides": {"hydra": ["hydra.mode=MULTIRUN"], "task": task},
            "job": {
                "num": "???",
                "override_dirname": "???",
                "config": {
                    "override_dirname": {
                        "kv_sep": "=",
                        "item_sep": ",",
                        "exclude_keys": ["experiment", "resume"],
                    }
                },
            },
            "runtime": {"cwd": str(sweep.parent)},
        },
        "seed": 0,
    }
    OmegaConf.save(OmegaConf.create(cfg), sweep / "multirun.yaml")


def write_job(
    run_dir: Path, overrides: list[str], *, model: str, n_experts: int | None, seed: int,
    accs: list[float], status: str = "completed", **fields,
) -> RunSummary:  # fmt: skip
    """One job's files, written as a run writes them (the record's writer)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(METRICS_COLUMNS)
        for epoch, acc in enumerate(accs):
            writer.writerow([epoch, 10 * (epoch + 1), 1.0, acc, 1.0, acc, 1e-3])
    summary = RunSummary(
        experiment="mnist1d", model=model, data="mnist1d", n_experts=n_experts, seed=seed,
        params=1000, status=status, epochs=len(accs), max_epochs=len(accs),
        val_acc_last=accs[-1] if accs else None, val_acc_best=max(accs) if accs else None,
        test_acc=accs[-1] if accs and status == "completed" else None, wall_time_s=1.0,
        run_dir=str(run_dir), overrides=list(overrides), segments=1, **fields,
    )  # fmt: skip
    atomic_write_json(run_dir / "summary.json", summary.to_dict())
    return summary


# The issue's sweep: -m experiment=mnist1d model=moe,cnn,cnn_matched experts=k1,k2
#   'optimizer.lr=3e-4,1e-3,3e-3' seed=0,1
ISSUE_TASK = [
    "experiment=mnist1d",
    "model=moe,cnn,cnn_matched",
    "experts=k1,k2",
    "optimizer.lr=3e-4,1e-3,3e-3",
    "seed=0,1",
]
LR_EFFECT = {"0.0003": 0.0, "0.001": 0.10, "0.003": 0.25}
MODEL_EFFECT = {"cnn": 0.50, "cnn_matched": 0.52, "moe": 0.55}


def issue_accuracy(
    job_overrides: tuple[str, ...], shift: float = 0.0
) -> tuple[str, int, int, float]:
    items = dict(o.split("=", 1) for o in job_overrides)
    model, k, seed = items["model"], int(items["experts"][1:]), int(items["seed"])
    lr = str(float(items["optimizer.lr"]))
    acc = MODEL_EFFECT[model] + LR_EFFECT[lr] + 0.01 * k + 0.013 * seed + shift
    return model, k, seed, acc


def make_issue_sweep(sweep: Path, shift: float = 0.0, skip: tuple[int, ...] = ()) -> Path:
    write_multirun_yaml(sweep, ISSUE_TASK)
    plan = read_plan(sweep)
    assert plan is not None and plan.jobs is not None and len(plan.jobs) == 36
    for job in plan.jobs:
        if job.num in skip:
            continue
        model, k, seed, acc = issue_accuracy(job.overrides, shift)
        write_job(
            job.run_dir, list(job.overrides), model=model, seed=seed, accs=[acc - 0.1, acc],
            n_experts=None if model == "cnn" else k,
        )  # fmt: skip
    return sweep


# ----------------------------------------------------------------------------------------------
# the run record: one definition, writer and reader agree
# ----------------------------------------------------------------------------------------------


def test_every_record_field_round_trips_through_the_reader(tmp_path: Path) -> None:
    values: dict[str, object] = {}
    for f in dataclasses.fields(RunSummary):
        kind = f.metadata["kind"]
        values[f.name] = {
            "str": f"text-{f.name}", "int": 7, "float": 0.25, "bool": True,
            "list": [f"{f.name}=1"], "dict": {"epoch": 1, "step": 9},
        }[kind]  # fmt: skip
    values.update(status="completed", stage="final", model="moe", data="mnist1d")
    summary = RunSummary(**values)
    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    atomic_write_json(run / "summary.json", summary.to_dict())
    (run / "metrics.csv").write_text(",".join(METRICS_COLUMNS) + "\n0,1,1,0.5,1,0.5,0.001\n")
    row = load_runs(tmp_path / "sweep").iloc[0]
    assert row["status"] == "completed", row["detail"]
    for name in SUMMARY_FIELDS:
        value = values[name]
        if name == "diverged_at":
            assert (row["diverged_at_epoch"], row["diverged_at_step"]) == (1, 9)
        elif name == "overrides":
            assert row["overrides"] == " ".join(value)
        elif name == "run_dir":
            assert row["run_dir_recorded"] == value
        else:
            assert row[name] == value, name
    # summary.csv has a column for every field of the record
    write_report(tmp_path / "sweep")
    columns = pd.read_csv(tmp_path / "sweep" / "summary.csv").columns
    assert {*SUMMARY_FIELDS} - {"diverged_at", "status"} <= set(columns)


RECORD_PATCH = """
    calibration_error: float | None = _field(doc="expected calibration error", kind="float", required=True)  # fmt: skip
"""


def test_a_field_added_to_the_record_reaches_the_reader_and_its_contract_check(
    tmp_path: Path,
) -> None:
    # A copy of the package with one field added to RunSummary, and nothing else changed.
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "src" / "moe_lab", src / "moe_lab")
    record = src / "moe_lab" / "run" / "record.py"
    text = record.read_text()
    anchor = "    # -- provenance: what the result depends on\n"
    assert anchor in text
    record.write_text(text.replace(anchor, RECORD_PATCH.lstrip("\n") + anchor))
    script = f"""
import json, warnings
from pathlib import Path
from moe_lab.run.record import REQUIRED_FIELDS, SUMMARY_FIELDS, RunSummary
from moe_lab.utils.io import atomic_write_json
from moe_lab.analysis import load_runs
sweep = Path({str(tmp_path / "sweep")!r})
assert "calibration_error" in SUMMARY_FIELDS and "calibration_error" in REQUIRED_FIELDS
for i, ce in enumerate((0.03, None)):
    d = sweep / str(i); d.mkdir(parents=True)
    s = RunSummary(model="cnn", data="d", seed=i, params=1, status="completed", epochs=1,
                   val_acc_last=0.5, val_acc_best=0.5, test_acc=0.5, wall_time_s=1.0,
                   calibration_error=ce).to_dict()
    if ce is None:
        del s["calibration_error"]  # a summary from before the field existed
    atomic_write_json(d / "summary.json", s)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runs = load_runs(sweep)
print(json.dumps({{"value": runs.loc[0, "calibration_error"], "statuses": list(runs["status"]),
                  "detail": runs.loc[1, "detail"],
                  "position": list(runs.columns).index("calibration_error"),
                  "n_columns": len(runs.columns)}}))
"""
    env = cli_env(PYTHONPATH=str(src))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["value"] == 0.03
    assert out["statuses"] == ["completed", "invalid"]
    assert "summary.json missing fields ['calibration_error']" in out["detail"]
    # a leading column of the table (the record's order), not an unknown extra one
    assert out["position"] < out["n_columns"] - 1
    assert "calibration_error" not in REQUIRED_FIELDS  # this process kept the real record


# ----------------------------------------------------------------------------------------------
# groups are everything that differs
# ----------------------------------------------------------------------------------------------


def test_the_issue_sweep_gives_one_group_per_learning_rate(tmp_path: Path) -> None:
    sweep = make_issue_sweep(tmp_path / "sweep")
    runs = load_runs(sweep)
    assert (runs["status"] == "completed").all() and len(runs) == 36
    summary = summarize(runs).set_index("group")
    labels = set(summary.index)
    lrs = ("0.0003", "0.001", "0.003")
    expected = {
        f"{name} optimizer.lr={lr}"
        for lr in lrs
        for name in (
            "moe K=1", "moe K=2", "cnn_matched K=1", "cnn_matched K=2",
            "cnn experts=k1", "cnn experts=k2",
        )
    }  # fmt: skip
    assert labels == expected
    assert (summary["n"] == 2).all() and (summary["warning"] == "").all()
    # each mean is over the two seeds of one learning rate, never over three
    row = summary.loc["moe K=2 optimizer.lr=0.003"]
    raw = [issue_accuracy(j.overrides)[3] for j in read_plan(sweep).jobs
           if {"model=moe", "experts=k2", "optimizer.lr=0.003"} <= set(j.overrides)]  # fmt: skip
    assert len(raw) == 2 and row["test_acc_mean"] == pytest.approx(sum(raw) / 2)
    # Welch tests compare only groups that agree on every other swept value
    for group, row in summary.iterrows():
        if group.startswith("moe"):
            k = group.split()[1]
            lr = group.split()[-1]
            assert row["baseline_group"] == f"cnn_matched {k} {lr}", group
            mine = runs[runs["group"] == group]["test_acc"]
            base = runs[runs["group"] == row["baseline_group"]]["test_acc"]
            ref = ref_welch(list(mine), list(base))
            assert row["diff"] == pytest.approx(ref["diff"]) and row["t"] == pytest.approx(ref["t"])
    # --baseline cnn: the cnn with the same experts preset and learning rate
    by_cnn = summarize(runs, baseline="cnn").set_index("group")
    assert by_cnn.loc["moe K=1 optimizer.lr=0.001", "baseline_group"] == (
        "cnn experts=k1 optimizer.lr=0.001"
    )
    write_report(sweep)
    report = (sweep / "report.md").read_text()
    assert "| moe K=2 optimizer.lr=0.003 | 2 | 0 |" in report
    assert "the swept overrides `experts`, `optimizer.lr`" in report


def test_routing_presets_stay_groups_of_their_own_without_an_experts_label(tmp_path: Path) -> None:
    # experts=k4,top2_of_4 changes top_k: the label says so once, and `experts` is no context
    sweep = tmp_path / "sweep"
    for num, (preset, top_k) in enumerate((("k4", None), ("top2_of_4", 2))):
        for seed in (0, 1):
            write_job(
                sweep / f"{num}_{seed}", [f"experts={preset}", f"seed={seed}", "model=moe"],
                model="moe", n_experts=4, seed=seed, accs=[0.5 + 0.01 * seed], top_k=top_k,
            )  # fmt: skip
    # killed attempts of two of these jobs, rerun since: they must not make `experts` a context
    for preset in ("k4", "top2_of_4"):
        killed = tmp_path / "sweep" / f"old_{preset}"
        (killed / ".hydra").mkdir(parents=True)
        (killed / ".hydra" / "overrides.yaml").write_text(
            f"- experts={preset}\n- seed=0\n- model=moe\n"
        )
        (killed / "metrics.csv").write_text("epoch,val_acc\n0,0.3\n")
        os.utime(killed / "metrics.csv", (0, 0))  # older than the reruns
    runs = load_runs(sweep)
    assert sorted(runs.loc[runs["status"] == "superseded", "run_name"]) == [
        "old_k4",
        "old_top2_of_4",
    ]
    summary = summarize(runs, baseline="moe K=4").set_index("group")
    assert sorted(summary.index) == ["moe K=4", "moe K=4 top-2"]
    assert summary.loc["moe K=4 top-2", "baseline_group"] == "moe K=4"


# ----------------------------------------------------------------------------------------------
# a sweep and its rerun count each (config, seed) once
# ----------------------------------------------------------------------------------------------


def test_a_sweep_and_its_rerun_never_count_a_seed_twice(tmp_path: Path) -> None:
    parent = tmp_path / "multirun"
    make_issue_sweep(parent / "a")
    time.sleep(0.05)  # the rerun is newer
    make_issue_sweep(parent / "b", shift=0.02)
    runs = load_runs(parent)
    assert (runs["status"] == "superseded").sum() == 36
    counted = runs[runs["status"] == "completed"]
    assert len(counted) == 36 and set(counted["run_name"].str[0]) == {"b"}
    summary = summarize(runs).set_index("group")
    assert (summary["n"] == 2).all()
    row = summary.loc["moe K=2 optimizer.lr=0.003"]
    raw = [issue_accuracy(j.overrides, 0.02)[3] for j in read_plan(parent / "b").jobs
           if {"model=moe", "experts=k2", "optimizer.lr=0.003"} <= set(j.overrides)]  # fmt: skip
    mean, se = ref_mean_se(raw)
    assert row["test_acc_mean"] == pytest.approx(mean) and row["test_acc_se"] == pytest.approx(se)
    old = runs[runs["status"] == "superseded"].iloc[0]
    assert old["superseded_by"].startswith("b/") and "same config and seed" in old["detail"]
    assert report_main([str(parent)]) == 0  # superseded runs are not unfinished jobs
    assert "## Superseded runs (36)" in (parent / "report.md").read_text()


def test_the_newest_completed_run_counts_over_a_newer_failure(tmp_path: Path) -> None:
    parent = tmp_path / "multirun"
    overrides = ["model=cnn", "seed=0"]
    write_job(parent / "a" / "0", overrides, model="cnn", n_experts=None, seed=0, accs=[0.6])
    time.sleep(0.05)
    write_job(
        parent / "b" / "0", overrides, model="cnn", n_experts=None, seed=0, accs=[0.1],
        status="failed", error_type="RuntimeError", error_message="CUDA out of memory",
    )  # fmt: skip
    runs = load_runs(parent).set_index("run_name")
    assert runs.loc["a/0", "status"] == "completed"
    assert runs.loc["b/0", "status"] == "superseded" and runs.loc["b/0", "superseded_by"] == "a/0"
    assert "was failed" in runs.loc["b/0", "detail"]


# ----------------------------------------------------------------------------------------------
# completeness: the jobs a sweep was meant to run
# ----------------------------------------------------------------------------------------------


def killed_sweep(tmp_path: Path) -> Path:
    """A seed=0,1,2 sweep killed after its first job: one job dir, and multirun.yaml."""
    sweep = tmp_path / "sweep"
    write_multirun_yaml(sweep, ["model=cnn", "seed=0,1,2"])
    job = read_plan(sweep).jobs[0]
    write_job(job.run_dir, list(job.overrides), model="cnn", n_experts=None, seed=0, accs=[0.5])
    return sweep


def test_jobs_that_never_started_are_listed_missing_and_fail_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = killed_sweep(tmp_path)
    runs = load_runs(sweep).set_index("run_name")
    assert list(runs.index) == ["0_model=cnn,seed=0", "1_model=cnn,seed=1", "2_model=cnn,seed=2"]
    assert list(runs["status"]) == ["completed", "missing", "missing"]
    assert list(runs["started"]) == [True, False, False]
    assert runs.loc["1_model=cnn,seed=1", "seed"] == 1
    assert runs.loc["2_model=cnn,seed=2", "detail"].startswith("never started: job 2 of ")
    assert report_main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 jobs did not complete (2 missing)" in err
    report = (sweep / "report.md").read_text()
    assert "- Jobs: 3 (1 completed, 2 missing)." in report
    assert "- Planned: 3 jobs in `multirun.yaml`; 2 never started." in report
    assert f"`python -m moe_lab.finish {sweep}`" in report
    with pytest.raises(SystemExit) as exit_info:  # the multirun exits non-zero too
        SweepReportCallback().on_multirun_end(
            OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
        )
    assert exit_info.value.code == 1


def test_interrupted_runs_are_not_completed_and_say_how_to_resume(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep / "0", ["seed=0"], model="cnn", n_experts=None, seed=0, accs=[0.5])
    write_job(
        sweep / "1", ["seed=1"], model="cnn", n_experts=None, seed=1, accs=[0.4],
        status="interrupted", error_message="SIGTERM",
    )  # fmt: skip
    runs = load_runs(sweep).set_index("run_name")
    assert runs.loc["1", "status"] == "interrupted"
    assert f"resume with resume={sweep / '1'}" in runs.loc["1", "detail"]
    summary = summarize(load_runs(sweep)).iloc[0]
    assert summary["n"] == 1 and summary["n_not_completed"] == 1
    assert report_main([str(sweep)]) == 2


def test_finish_plans_resume_for_checkpointed_jobs_and_dirs_for_new_ones(tmp_path: Path) -> None:
    sweep = killed_sweep(tmp_path)
    plan = read_plan(sweep)
    resumable = plan.jobs[1].run_dir
    (resumable / "checkpoints").mkdir(parents=True)
    (resumable / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    from moe_lab.finish import plan_actions

    actions, kept = plan_actions(plan, load_runs(sweep))
    assert kept == [] and [a.job.num for a in actions] == [1, 2]
    resume, start = actions
    assert resume.kind == "resume" and resume.command[-1] == f"resume='{resumable}'"
    assert start.kind == "start" and start.command[-1] == f"hydra.run.dir='{plan.jobs[2].run_dir}'"
    assert start.command[3:5] == ["model=cnn", "seed=2"]


# ----------------------------------------------------------------------------------------------
# faults: one bad job never sinks the report, and the report is replaced as one set
# ----------------------------------------------------------------------------------------------


def clean_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    for seed in range(3):
        for model, acc in (("cnn", 0.6), ("moe", 0.7)):
            write_job(
                sweep / f"{model}_{seed}", [f"model={model}", f"seed={seed}"], model=model,
                n_experts=2 if model == "moe" else None, seed=seed, accs=[acc - 0.1, acc + 0.01 * seed],
            )  # fmt: skip
    return sweep


def corrupt(kind: str, job: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Break one job the way ``kind`` says; returns the path the report must name."""
    if kind == "unreadable dir":
        if os.geteuid() != 0:
            job.chmod(0)
        else:  # root reads any dir: make listing this one fail as chmod 000 would
            real = os.scandir

            def scandir(path="."):
                if Path(path) == job:
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real(path)

            monkeypatch.setattr(os, "scandir", scandir)
        return str(job)
    if kind == "corrupt metrics.csv":
        (job / "metrics.csv").write_bytes(b"\xff\xfe\xfd\x00\x81epoch\n")  # not text at all
        return str(job / "metrics.csv")
    if kind == "ragged metrics.csv":
        (job / "metrics.csv").write_text("epoch,val_acc\n0,0.5\n1,0.6,7,8,9\n")
        return str(job / "metrics.csv")
    if kind == "deeply nested summary.json":
        (job / "summary.json").write_text("[" * 200_000 + "]" * 200_000)
        return str(job / "summary.json")
    if kind == "summary.json not a file":
        (job / "summary.json").unlink()
        (job / "summary.json").mkdir()
        return str(job / "summary.json")
    raise AssertionError(kind)


FAULTS = [
    "unreadable dir",
    "corrupt metrics.csv",
    "ragged metrics.csv",
    "deeply nested summary.json",
    "summary.json not a file",
]


@pytest.mark.parametrize("kind", FAULTS)
def test_one_bad_job_is_listed_invalid_and_the_rest_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    sweep = clean_sweep(tmp_path)
    named = corrupt(kind, sweep / "moe_1", monkeypatch)
    try:
        code = report_main([str(sweep)])
    finally:
        (sweep / "moe_1").chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2
    assert "1 of 6 jobs did not complete (1 invalid): moe_1 (invalid)" in err
    assert "Traceback" not in err
    runs = pd.read_csv(sweep / "summary.csv").set_index("run_name")
    assert runs.loc["moe_1", "status"] == "invalid"
    assert named in runs.loc["moe_1", "detail"]
    report = (sweep / "report.md").read_text()
    assert named in report
    # the other five runs are reported; moe's mean is over its two good seeds
    with pytest.warns(UserWarning, match=re.escape(f"listed as status 'invalid': {named}")):
        runs = load_runs(sweep)
    groups = summarize(runs).set_index("group")
    assert groups.loc["cnn", "n"] == 3 and groups.loc["moe K=2", "n"] == 2
    good = [0.7, 0.72]
    assert groups.loc["moe K=2", "test_acc_mean"] == pytest.approx(sum(good) / 2)


def report_bytes(sweep: Path) -> dict[str, bytes]:
    return {name: (sweep / name).read_bytes() for name in REPORT_NAMES}


@pytest.mark.parametrize("failing_rename", [2, 4])
def test_a_failure_mid_write_keeps_the_old_report_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_rename: int
) -> None:
    sweep = clean_sweep(tmp_path)
    write_report(sweep)
    before = report_bytes(sweep)
    shutil.rmtree(sweep / "moe_2")  # the next report differs in every file
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        if Path(dst).name in REPORT_NAMES:
            calls["n"] += 1
            if calls["n"] == failing_rename:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left on device"):
        write_report(sweep)
    assert report_bytes(sweep) == before  # the renames already done were put back
    assert not [p.name for p in sweep.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(os, "replace", real_replace)
    write_report(sweep)
    after = report_bytes(sweep)
    assert all(after[name] != before[name] for name in REPORT_NAMES)


def test_a_full_disk_while_staging_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = clean_sweep(tmp_path)
    write_report(sweep)
    before = report_bytes(sweep)
    shutil.rmtree(sweep / "moe_2")
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 3:  # the third file of the set
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device"):
        write_report(sweep)
    assert report_bytes(sweep) == before
    assert not [p.name for p in sweep.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# figures: % on the axis, integer epochs, 200 dpi PNG plus SVG, a caption
# ----------------------------------------------------------------------------------------------


def png_dpi(path: Path) -> float:
    data = path.read_bytes()
    at = data.index(b"pHYs")
    x_per_metre = int.from_bytes(data[at + 4 : at + 8], "big")
    assert data[at + 12] == 1  # unit: metre
    return x_per_metre * 0.0254


def test_figure_is_in_percent_with_integer_epochs_a_caption_and_a_vector_copy(
    tmp_path: Path,
) -> None:
    from moe_lab.analysis import load_curves, plot_curves
    from moe_lab.analysis.plots import figure_caption

    sweep = tmp_path / "sweep"
    for seed in range(3):  # one-epoch runs: the case that used to get ticks at 0.96, 0.98, ...
        write_job(sweep / str(seed), [f"seed={seed}"], model="cnn", n_experts=None, seed=seed,
                  accs=[0.6 + 0.01 * seed])  # fmt: skip
    paths = write_report(sweep)
    assert png_dpi(paths["curves_png"]) == pytest.approx(200, abs=0.5)
    svg = paths["curves_svg"].read_text()
    assert svg.startswith("<?xml") and "<svg" in svg and "<path" in svg and "<image" not in svg
    runs = load_runs(sweep)
    caption = figure_caption(runs)
    assert caption.startswith("data: mnist1d · budget: 1 epoch per run · seeds: 0–2")
    figure = plot_curves(load_curves(runs), caption=caption)
    figure.canvas.draw()
    axis = figure.axes[0]
    low, high = axis.get_xlim()
    ticks = [t for t in axis.get_xticks() if low <= t <= high]
    assert ticks == [1.0]
    assert axis.get_ylabel() == "validation accuracy (%)"
    (line,) = axis.get_lines()
    assert line.get_ydata()[0] == pytest.approx(100 * np.mean([0.6, 0.61, 0.62]))
    assert figure.get_supxlabel() == caption
    assert caption in (sweep / "report.md").read_text()
    assert "[curves.svg](curves.svg)" in (sweep / "report.md").read_text()


# ----------------------------------------------------------------------------------------------
# tiny real sweeps
# ----------------------------------------------------------------------------------------------

TINY = [
    "data=digits",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.accelerator=cpu",
    "logger=csv",
    "num_threads=1",
]


def the_sweep_dir(log_dir: Path) -> Path:
    (sweep,) = [p.parent for p in log_dir.rglob("multirun.yaml")]
    return sweep


def test_real_sweep_over_learning_rates_reports_one_group_per_rate(
    tmp_path: Path, data_dir: Path
) -> None:
    log_dir = tmp_path / "out"
    proc = run_module(
        "moe_lab.train", "-m", "model=moe", "experts=k2", "optimizer.lr=1e-3,3e-3", "seed=0",
        *TINY, "hydra/launcher=basic", "experiment_name=lr_sweep",
        f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = the_sweep_dir(log_dir)
    table = pd.read_csv(sweep / "summary.csv")
    assert sorted(table["group"]) == ["moe K=2 optimizer.lr=0.001", "moe K=2 optimizer.lr=0.003"]
    report = (sweep / "report.md").read_text()
    assert "| moe K=2 optimizer.lr=0.001 | 1 |" in report
    assert "- Planned: 2 jobs in `multirun.yaml`; 0 never started." in report


@pytest.mark.slow  # a real sweep, SIGKILLed, then two real jobs: ~1-2 min on 2 busy cores
def test_killed_sweep_reports_missing_jobs_and_finish_completes_it(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "moe_lab.train", "-m", "model=cnn", "seed=0,1,2", *TINY,
        "hydra/launcher=basic", "experiment_name=killed",
        f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}",
    ]  # fmt: skip
    sweep_proc = subprocess.Popen(
        command, cwd=tmp_path, env=cli_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:  # SIGKILL as soon as the first job has its summary
            done = [
                p for p in log_dir.rglob("summary.json")
                if json.loads(p.read_text() or "{}").get("status") == "completed"
            ]  # fmt: skip
            if done or sweep_proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        os.killpg(sweep_proc.pid, signal.SIGKILL)
        sweep_proc.wait()
    assert done, "the first job never completed"
    sweep = the_sweep_dir(log_dir)

    assert report_main([str(sweep)]) != 0
    runs = load_runs(sweep)
    assert (runs["status"] == "completed").sum() == 1
    others = runs[runs["status"] != "completed"]
    assert len(others) == 2 and set(others["status"]) <= {"missing", "partial"}
    assert not others["started"].iloc[-1]  # the last job never started
    assert "2 of 3 jobs did not complete" in capsys.readouterr().err

    assert finish_main([str(sweep), "--jobs", "2"]) == 0, capsys.readouterr()
    runs = load_runs(sweep)
    assert list(runs["status"]) == ["completed"] * 3
    plan = read_plan(sweep)
    assert sorted(runs["run_dir"]) == sorted(str(j.run_dir) for j in plan.jobs)  # Hydra's dirs
    assert sorted(runs["seed"]) == [0, 1, 2]
    report = (sweep / "report.md").read_text()
    assert "- Jobs: 3 (3 completed)." in report and "| cnn | 3 | 0 |" in report
    assert report_main([str(sweep)]) == 0
    assert not math.isnan(pd.read_csv(sweep / "summary.csv")["test_acc"].mean())
