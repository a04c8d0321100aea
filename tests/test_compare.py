"""The equal-budget comparison end to end, through its CLI: tiny budgets, real runs.

Every number is checked against the raw files the runs wrote (summary.json, study.db read with
Optuna itself, .hydra/overrides.yaml) and against independent references (scipy's Welch test,
enumeration of the expected maximum).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from scipy import stats

from conftest import cli_env, run_module

TESTS_DIR = Path(__file__).resolve().parent


def _tiny(arms: str, trials: int, *extra: str, epochs: int = 1) -> list[str]:
    """The overrides of a tiny digits comparison (2 final seeds, a few batches, CSV logger)."""
    return [
        "experiment=digits",
        f"compare.arms={arms}",
        f"compare.trials={trials}",
        "compare.seeds=2",
        f"trainer.max_epochs={epochs}",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "logger=csv",
        *extra,
    ]


TINY = _tiny("[cnn,moe]", 3, "data._target_=compare_spy.SpyDigits")


def _env(root: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "MOE_LAB_SPY_LOG": str(root / "spy.jsonl")}


def _paths(root: Path) -> list[str]:
    return [f"paths.data_dir={root / 'data'}", f"paths.log_dir={root / 'out'}"]


def _comparison_dir(root: Path) -> Path:
    markers = list((root / "out" / "compare").glob("*/*/comparison.json"))
    assert len(markers) == 1, f"expected one comparison dir, found {markers}"
    return markers[0].parent


def _summaries(comparison: Path, stage: str, arm: str) -> dict[str, dict]:
    """{run dir name: summary.json} of one arm's runs of one stage, read from the files."""
    return {
        path.parent.name: json.loads(path.read_text())
        for path in sorted((comparison / stage / arm).glob("*/summary.json"))
    }


def _trials(comparison: Path, arm: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=arm, storage=f"sqlite:///{comparison / 'study.db'}")
    return study.get_trials(deepcopy=False)


def _overrides(run_dir: Path) -> dict[str, str]:
    items = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    return dict(item.split("=", 1) for item in items)


def _spy(root: Path) -> list[dict]:
    path = root / "spy.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, subprocess.CompletedProcess, float]:
    """A tiny comparison on the preset's launcher (joblib, 2 one-thread workers)."""
    root = tmp_path_factory.mktemp("compare")
    start = time.perf_counter()
    proc = run_module("moe_lab.compare", *TINY, *_paths(root), cwd=root, timeout=600, **_env(root))
    wall = time.perf_counter() - start
    assert proc.returncode == 0, f"comparison failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return root, _comparison_dir(root), proc, wall


def test_tiny_comparison_writes_every_file(tiny) -> None:
    _, comparison, proc, wall = tiny
    print(f"tiny comparison (2 arms x (3 trials + 2 final runs), joblib): {wall:.1f} s")
    for name in (
        "comparison.json",
        "study.db",
        "report.md",
        "summary.csv",
        "trials.csv",
        "runs.csv",
        "best_params.json",
        *(
            f"{fig}.{ext}"
            for fig in ("evp", "tuning_trace", "final_curves")
            for ext in ("png", "svg")
        ),
    ):
        assert (comparison / name).is_file(), name
    assert str(comparison / "report.md") in proc.stdout
    assert comparison.parent.name == "digits" and comparison.parent.parent.name == "compare"


def test_each_arm_has_its_trials_and_fresh_final_seeds(tiny) -> None:
    _, comparison, _, _ = tiny
    all_tune_seeds, all_final_seeds = set(), set()
    for arm, model in (("cnn", "cnn"), ("moe", "moe")):
        tune = _summaries(comparison, "tune", arm)
        final = _summaries(comparison, "final", arm)
        assert sorted(tune) == ["trial_000", "trial_001", "trial_002"]
        assert sorted(final) == ["seed_1000", "seed_1001"]
        for summary in tune.values():
            assert (summary["stage"], summary["arm"], summary["model"]) == ("tune", arm, model)
            assert summary["status"] == "completed"
            assert summary["test_acc"] is None  # never scored
            assert summary["max_epochs"] == 1
        for summary in final.values():
            assert (summary["stage"], summary["arm"], summary["model"]) == ("final", arm, model)
            assert summary["status"] == "completed" and summary["test_acc"] is not None
        all_tune_seeds |= {s["seed"] for s in tune.values()}
        all_final_seeds |= {s["seed"] for s in final.values()}
        assert {s["seed"] for s in tune.values()} == {0, 1, 2}
    assert all_final_seeds == {1000, 1001}
    assert not all_tune_seeds & all_final_seeds


def test_study_db_holds_the_trials_the_runs_report(tiny) -> None:
    _, comparison, _, _ = tiny
    best_params = json.loads((comparison / "best_params.json").read_text())
    for arm in ("cnn", "moe"):
        trials = _trials(comparison, arm)
        assert [t.number for t in trials] == [0, 1, 2]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        tune = _summaries(comparison, "tune", arm)
        for trial in trials:
            # the whole proposal in one record: run dir, seed, arm and the parameters it ran
            proposal = trial.user_attrs["proposal"]
            assert proposal["seed"] == trial.number and proposal["arm"] == arm
            assert proposal["params"] == trial.params
            run_dir = comparison / proposal["run_dir"]
            summary = tune[run_dir.name]
            assert trial.value == summary["val_acc_best"]  # the objective: best val accuracy
            # the run trained with the hyperparameters Optuna proposed
            overrides = _overrides(run_dir)
            for key, value in trial.params.items():
                assert float(overrides[key]) == value
            assert overrides["test"] == "false" and overrides["stage"] == "tune"
        best = max(trials, key=lambda t: (t.value, -t.number))
        assert best_params[arm] == best.params
        for run_dir in (comparison / "final" / arm).glob("seed_*"):
            overrides = _overrides(run_dir)
            assert {k: float(overrides[k]) for k in best.params} == best.params
            assert overrides["test"] == "true" and overrides["stage"] == "final"
    # the same search space for both arms: lr, weight decay and dropout
    assert (
        set(best_params["cnn"])
        == set(best_params["moe"])
        == {
            "optimizer.lr",
            "optimizer.weight_decay",
            "data.topology.dense_dropout",
        }
    )


def test_no_trial_touches_the_test_split(tiny) -> None:
    root, comparison, _, _ = tiny
    events = _spy(root)
    setups = [e for e in events if e["event"] == "setup"]
    tune_setups = [e for e in setups if e["seed"] < 1000]
    final_setups = [e for e in setups if e["seed"] >= 1000]
    assert len(tune_setups) == 6 and len(final_setups) == 4  # 2 arms x (3 trials, 2 seeds)
    assert all(not e["load_test"] and not e["has_test"] for e in tune_setups)
    assert all(e["load_test"] and e["has_test"] for e in final_setups)
    test_uses = [e for e in events if e["event"] in ("split_test", "test_dataloader")]
    assert test_uses and all(e["seed"] >= 1000 for e in test_uses)
    # each final run scores the test set once
    loaders = [e["seed"] for e in events if e["event"] == "test_dataloader"]
    assert sorted(loaders) == [1000, 1000, 1001, 1001]
    for run_dir in (comparison / "tune").glob("*/trial_*"):
        columns = pd.read_csv(run_dir / "metrics.csv").columns
        assert not [c for c in columns if "test" in c]


def _expected_max(values: list[float], n: int) -> float:
    return statistics.fmean(max(draw) for draw in itertools.product(values, repeat=n))


def test_summary_numbers_match_the_raw_runs(tiny) -> None:
    _, comparison, _, _ = tiny
    summary = pd.read_csv(comparison / "summary.csv").set_index("arm")
    accs = {}
    for arm in ("cnn", "moe"):
        final = _summaries(comparison, "final", arm)
        accs[arm] = [s["test_acc"] for s in final.values()]
        row = summary.loc[arm]
        assert row["test_acc_mean"] == pytest.approx(statistics.fmean(accs[arm]))
        assert row["test_acc_se"] == pytest.approx(statistics.stdev(accs[arm]) / math.sqrt(2))
        values = [s["val_acc_best"] for s in _summaries(comparison, "tune", arm).values()]
        assert row["best_val_acc"] == pytest.approx(max(values))
        assert row["evp_n1"] == pytest.approx(_expected_max(values, 1))
        assert row["evp_nN"] == pytest.approx(_expected_max(values, 3))
        assert row["budget_trials"] == 3 and row["trials_completed"] == 3
        tune_walls = [s["wall_time_s"] for s in _summaries(comparison, "tune", arm).values()]
        assert row["tune_wall_time_s"] == pytest.approx(sum(tune_walls))
        assert row["tune_epochs"] == 3
    # baseline: cnn (no cnn_matched arm); Welch's t-test recomputed with scipy
    assert summary.loc["cnn", "is_baseline"] and not summary.loc["moe", "is_baseline"]
    if statistics.pvariance(accs["moe"]) + statistics.pvariance(accs["cnn"]) > 0:
        reference = stats.ttest_ind(accs["moe"], accs["cnn"], equal_var=False)
        assert summary.loc["moe", "p_value"] == pytest.approx(reference.pvalue)
    assert summary.loc["moe", "diff"] == pytest.approx(
        statistics.fmean(accs["moe"]) - statistics.fmean(accs["cnn"])
    )
    report = (comparison / "report.md").read_text()
    # the verdict names the matching axis: the plain cnn against its 4x larger MoE twin
    assert "moe K=2 vs cnn (" in report and "× FLOPs, " in report
    assert ") at an equal budget of 3 trials × 1 epoch per arm:" in report
    assert "Expected validation performance" in report


def test_rebuilding_the_report(tiny, tmp_path: Path, capsys) -> None:
    """``python -m moe_lab.compare.report DIR [--baseline ARM]`` (its main, in this process)."""
    from moe_lab.compare.report import main as report_main

    _, comparison, _, _ = tiny
    assert report_main([str(comparison), "--baseline", "moe"]) == 0
    summary = pd.read_csv(comparison / "summary.csv").set_index("arm")
    assert summary.loc["moe", "is_baseline"] and not summary.loc["cnn", "is_baseline"]
    assert "cnn vs moe K=2 (" in (comparison / "report.md").read_text()
    assert report_main([str(comparison), "--baseline", "nope"]) == 2
    assert "not one of the arms" in capsys.readouterr().err
    assert report_main([str(tmp_path)]) == 2
    assert "not a comparison dir" in capsys.readouterr().err
    # leave the module's report as the comparison wrote it
    assert report_main([str(comparison)]) == 0
    assert "Wall time of the comparison: " in (comparison / "report.md").read_text()


def test_resuming_a_finished_comparison_runs_nothing(tiny) -> None:
    root, comparison, _, _ = tiny
    before = {p: p.stat().st_mtime_ns for p in comparison.glob("*/*/*/summary.json")}
    proc = run_module(
        "moe_lab.compare",
        *TINY,
        *_paths(root),
        f"resume={comparison}",
        "hydra/launcher=basic",  # how it is run may change; what it computes may not
        cwd=root,
        **_env(root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching" not in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in comparison.glob("*/*/*/summary.json")}
    assert after == before and len(after) == 10


def test_resume_with_other_settings_is_refused(tiny) -> None:
    root, comparison, _, _ = tiny
    args = [a for a in TINY if not a.startswith("compare.trials")]
    proc = run_module(
        "moe_lab.compare", *args, "compare.trials=4", *_paths(root), f"resume={comparison}",
        cwd=root, **_env(root),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "started with different settings" in proc.stderr and "trials" in proc.stderr


# ---------------------------------------------------------------------------- a damaged store
def _copy(comparison: Path, tmp_path: Path) -> Path:
    """A copy of the tiny comparison's dir to damage (the module's own stays as it was)."""
    import shutil

    target = tmp_path / "copy" / comparison.name
    shutil.copytree(
        comparison, target, ignore=shutil.ignore_patterns(".compare.lock", ".jobs.lock")
    )
    return target


def _resume(root: Path, comparison: Path) -> subprocess.CompletedProcess[str]:
    return run_module(
        "moe_lab.compare", *TINY, *_paths(root), f"resume={comparison}", "hydra/launcher=basic",
        cwd=root, **_env(root),
    )  # fmt: skip


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_moe_report_renders_a_comparison_dir_as_a_comparison(tiny, tmp_path: Path) -> None:
    """One report command: ``python -m moe_lab.report`` on a comparison dir renders the
    comparison's report (it used to overwrite it with a sweep report of one-run groups)."""
    root, comparison, _, _ = tiny
    copy = _copy(comparison, tmp_path)
    before = (copy / "report.md").read_text().replace(str(comparison), str(copy))
    proc = run_module("moe_lab.report", str(copy), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = (copy / "report.md").read_text()
    assert after.startswith("# Comparison report") and after == before
    assert list(pd.read_csv(copy / "summary.csv")["arm"]) == ["cnn", "moe"]
    assert (copy / "trials.csv").is_file() and (copy / "best_params.json").is_file()


def test_a_garbage_study_db_is_refused_in_one_line(tiny, tmp_path: Path) -> None:
    root, comparison, _, _ = tiny
    copy = _copy(comparison, tmp_path)
    (copy / "study.db").write_bytes(b"this is not a database " * 100)
    proc = _resume(root, copy)
    assert proc.returncode == 2
    assert "study.db is not a readable Optuna study" in _one_line_error(proc)
    report = run_module("moe_lab.report", str(copy), cwd=root)
    assert report.returncode == 2
    assert "study.db is not a readable Optuna study" in _one_line_error(report)


@pytest.mark.parametrize("how", ["truncated", "replaced"])
def test_an_emptied_study_db_never_reruns_finished_trials(tiny, tmp_path: Path, how: str) -> None:
    """An emptied study.db used to restart tuning from trial 0 silently, moving the finished
    trials aside; now the resume is refused, naming the file, and nothing on disk changes."""
    root, comparison, _, _ = tiny
    copy = _copy(comparison, tmp_path)
    db = copy / "study.db"
    if how == "truncated":
        db.write_bytes(b"")
    else:  # a valid, fresh study file in its place: no trial of any arm
        db.unlink()
        optuna.create_study(study_name="cnn", storage=f"sqlite:///{db}")
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("summary.json")}
    proc = _resume(root, copy)
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert str(db) in line
    assert (
        "is empty (0 bytes)" if how == "truncated" else "holds 0 trial(s) of study 'cnn'"
    ) in line
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("summary.json")} == before
    assert not list(copy.rglob(".killed"))


def test_a_proposal_cut_off_by_a_kill_is_abandoned_never_run(tiny, tmp_path: Path) -> None:
    """A kill after Optuna made a trial but before its proposal was recorded (here: one of its
    three parameters drawn, no run dir, no seed) used to run it in ``<dir>/None/`` with the
    preset's values for the rest; now the resume closes it as abandoned, outside the budget."""
    root, comparison, _, _ = tiny
    copy = _copy(comparison, tmp_path)
    study = optuna.load_study(study_name="cnn", storage=f"sqlite:///{copy / 'study.db'}")
    trial = study.ask()
    trial.suggest_float("optimizer.lr", 1e-4, 1e-2, log=True)  # the kill lands here
    proc = _resume(root, copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching" not in proc.stdout  # the budget of 3 trials was already spent
    assert not (copy / "None").exists() and not list(copy.rglob("None"))
    trials = _trials(copy, "cnn")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL"]
    assert trials[3].user_attrs["abandoned"] is True
    table = pd.read_csv(copy / "trials.csv")
    assert list(table.loc[table["arm"] == "cnn", "state"]) == ["COMPLETE"] * 3 + ["ABANDONED"]
    assert table.loc[table["state"] != "ABANDONED", "run_dir"].notna().all()
    summary = pd.read_csv(copy / "summary.csv").set_index("arm")
    assert summary.loc["cnn", "trials_completed"] == 3 and summary.loc["cnn", "trials_failed"] == 0
    assert (
        "1 trial(s) were cut off by a kill while they were proposed"
        in (copy / "report.md").read_text()
    )


# ---------------------------------------------------------------------------- kill and resume
def start_compare(root: Path, args: list[str]) -> subprocess.Popen[str]:
    """``python -m moe_lab.compare args`` in the background, in its own process group: a kill
    (or a terminal's Ctrl-C) reaches every process of it."""
    return subprocess.Popen(
        [sys.executable, "-m", "moe_lab.compare", *args],
        cwd=root,
        env=cli_env(**_env(root)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """However the block ends (a failed assertion, a timeout), no process of ``proc``'s group
    outlives it."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def kill_when(condition, proc: subprocess.Popen, timeout: float) -> None:
    """SIGKILL ``proc``'s whole group once ``condition()`` holds (see :func:`_wait_for`), and
    wait for it."""
    with reaped(proc):
        _wait_for(condition, proc, timeout)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def _wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(
                f"the comparison ended before the kill:\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}"
            )
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the kill point never came")


@pytest.mark.slow
def test_killed_comparison_resumes_without_rerunning_or_double_counting(tmp_path: Path) -> None:
    """SIGKILL after the first trial finished, while the second one is mid-run (it has a
    checkpoint): the resumed comparison records the first as it stood, continues the second
    from its checkpoint, and ends with exactly 3 trials and 2 final runs per arm."""
    root = tmp_path
    args = [
        *(a for a in TINY if not a.startswith("trainer.max_epochs")),
        "trainer.max_epochs=3",
        "+callbacks.slow._target_=compare_spy.SlowEpochs",
        "hydra/launcher=basic",  # one job after another: the kill point is known
        *_paths(root),
    ]
    proc = start_compare(root, args)
    out = root / "out" / "compare" / "digits"
    first = lambda: list(out.glob("*/tune/cnn/trial_000/summary.json"))  # noqa: E731
    second_ckpt = lambda: list(out.glob("*/tune/moe/trial_000/checkpoints/last.ckpt"))  # noqa: E731
    try:
        _wait_for(lambda: first() and second_ckpt(), proc, timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    comparison = _comparison_dir(root)
    # the cut-off trial's record (written at start and after each epoch) says it never ended
    cut_off = json.loads((comparison / "tune" / "moe" / "trial_000" / "summary.json").read_text())
    assert cut_off["status"] == "running"
    states = {arm: [t.state.name for t in _trials(comparison, arm)] for arm in ("cnn", "moe")}
    assert states == {"cnn": ["RUNNING"], "moe": ["RUNNING"]}  # launched, never recorded
    first_summary = comparison / "tune" / "cnn" / "trial_000" / "summary.json"
    first_text, first_mtime = first_summary.read_text(), first_summary.stat().st_mtime_ns

    resumed = run_module(
        "moe_lab.compare", *args, f"resume={comparison}", cwd=root, timeout=600, **_env(root)
    )
    assert resumed.returncode == 0, f"{resumed.stdout[-3000:]}\n{resumed.stderr[-3000:]}"
    assert "trial(s) were cut off by the kill" in resumed.stdout
    for arm in ("cnn", "moe"):
        tune = _summaries(comparison, "tune", arm)
        final = _summaries(comparison, "final", arm)
        assert sorted(tune) == ["trial_000", "trial_001", "trial_002"]
        assert sorted(final) == ["seed_1000", "seed_1001"]
        assert all(s["status"] == "completed" for s in (*tune.values(), *final.values()))
        trials = _trials(comparison, arm)
        assert [(t.number, t.state.name) for t in trials] == [
            (0, "COMPLETE"),
            (1, "COMPLETE"),
            (2, "COMPLETE"),
        ]
        for trial in trials:
            run_dir = Path(trial.user_attrs["proposal"]["run_dir"])
            assert trial.value == tune[run_dir.name]["val_acc_best"]
    # the finished trial was not run again
    assert first_summary.read_text() == first_text
    assert first_summary.stat().st_mtime_ns == first_mtime
    # the cut-off trial continued from its checkpoint, in its own dir, to its 3 epochs
    cut = comparison / "tune" / "moe" / "trial_000"
    assert list(cut.glob(".hydra_resume_*")), "the cut-off trial was not resumed in place"
    assert len(pd.read_csv(cut / "metrics.csv")) == 3
    assert json.loads((cut / "summary.json").read_text())["epochs"] == 3
    # 6 trials + 4 final runs, no other run dir
    assert len(list(comparison.glob("*/*/*/summary.json"))) == 10


# ---------------------------------------------------------------------------- submitit
@pytest.mark.slow
def test_trials_run_as_submitit_jobs(tmp_path: Path) -> None:
    """The SLURM path's launcher, with submitit's local executor: each trial and final run is a
    submitit job (its own process), two at a time, sharing the study in study.db."""
    args = _tiny(
        "[cnn]", 2, "compare.batch_size=2", "hydra/launcher=submitit_local", *_paths(tmp_path)
    )
    proc = run_module("moe_lab.compare", *args, cwd=tmp_path, timeout=600, **_env(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    comparison = _comparison_dir(tmp_path)
    tune = _summaries(comparison, "tune", "cnn")
    final = _summaries(comparison, "final", "cnn")
    assert sorted(tune) == ["trial_000", "trial_001"] and sorted(final) == [
        "seed_1000",
        "seed_1001",
    ]
    assert all(s["status"] == "completed" for s in (*tune.values(), *final.values()))
    assert [t.state.name for t in _trials(comparison, "cnn")] == ["COMPLETE", "COMPLETE"]
    # submitit ran them: one job folder per run, each with the job's result pickle
    results = list((comparison / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 4, results


def _kill_orphans(root: Path) -> None:
    """End the joblib workers this test orphaned (found by the log path in their environment):
    idle, they would linger for loky's timeout."""
    marker = f"MOE_LAB_SPY_LOG={root / 'spy.jsonl'}".encode()
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc_dir / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.mark.slow
def test_resume_waits_for_the_jobs_of_a_killed_comparison(tmp_path: Path) -> None:
    """Killing only the comparison's process leaves joblib's workers running their trials; a
    resume then must not start the same trials again beside them. It is refused until they end,
    and then records what they wrote without running it again."""
    import fcntl

    root = tmp_path
    args = _tiny(
        "[cnn]",
        2,
        "+callbacks.slow._target_=compare_spy.SlowEpochs",
        "+callbacks.slow.seconds=30",  # the orphaned trials outlast the refused resume's start
        *_paths(root),
        epochs=2,
    )  # the preset's launcher: joblib, 2 workers
    # files, not pipes: the orphaned workers keep the comparison's stdout and stderr open
    with open(root / "first.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moe_lab.compare", *args],
            cwd=root,
            env=cli_env(**_env(root)),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    out = root / "out" / "compare" / "digits"
    try:
        _wait_for(lambda: list(out.glob("*/tune/cnn/trial_00*/metrics.csv")), proc, timeout=300)
        proc.kill()  # the comparison process only, not its workers
        proc.wait()
        comparison = _comparison_dir(root)
        refused = run_module(
            "moe_lab.compare", *args, f"resume={comparison}", cwd=root, **_env(root)
        )
        assert refused.returncode == 2
        assert "are still running" in refused.stderr
        # the orphaned workers finish their trials, then release the jobs lock
        deadline = time.monotonic() + 300
        with open(comparison / ".jobs.lock", "a+") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the workers never finished"
                    time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_orphans(root)
    written = {p: p.read_text() for p in (comparison / "tune" / "cnn").glob("*/summary.json")}
    assert written, "the orphaned workers wrote no summary"
    resumed = run_module(
        "moe_lab.compare", *args, f"resume={comparison}", cwd=root, timeout=600, **_env(root)
    )
    assert resumed.returncode == 0, f"{resumed.stdout[-3000:]}\n{resumed.stderr[-3000:]}"
    assert sorted(_summaries(comparison, "tune", "cnn")) == ["trial_000", "trial_001"]
    assert sorted(_summaries(comparison, "final", "cnn")) == ["seed_1000", "seed_1001"]
    assert [t.state.name for t in _trials(comparison, "cnn")] == ["COMPLETE", "COMPLETE"]
    for path, text in written.items():  # recorded as the workers left them, not run again
        assert path.read_text() == text


@pytest.mark.slow
def test_failed_and_diverged_trials_use_up_the_budget(tmp_path: Path) -> None:
    """Trial 1 fails and trial 2 diverges: both are told to Optuna as FAIL, never retried, listed
    in the report, and score 0 in the expected-validation-performance curve."""
    args = _tiny(
        "[cnn]",
        3,
        "hydra/launcher=basic",
        "+callbacks.fail._target_=compare_spy.FailOnSeeds",
        "+callbacks.fail.seed=${seed}",
        "+callbacks.fail.fail=1",
        "+callbacks.fail.diverge=2",
        *_paths(tmp_path),
    )
    proc = run_module("moe_lab.compare", *args, cwd=tmp_path, timeout=600, **_env(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    comparison = _comparison_dir(tmp_path)
    tune = _summaries(comparison, "tune", "cnn")
    assert [tune[f"trial_00{i}"]["status"] for i in range(3)] == ["completed", "failed", "diverged"]
    trials = _trials(comparison, "cnn")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL"]  # 3 trials, no retry
    assert [t.user_attrs["status"] for t in trials] == ["completed", "failed", "diverged"]
    # the best (only) completed trial goes to the final stage
    final = _summaries(comparison, "final", "cnn")
    assert sorted(final) == ["seed_1000", "seed_1001"]
    assert all(s["status"] == "completed" for s in final.values())
    summary = pd.read_csv(comparison / "summary.csv").set_index("arm")
    assert summary.loc["cnn", "trials_completed"] == 1 and summary.loc["cnn", "trials_failed"] == 2
    value = tune["trial_000"]["val_acc_best"]
    assert summary.loc["cnn", "evp_n1"] == pytest.approx(value / 3)  # failures score 0
    assert summary.loc["cnn", "evp_nN"] == pytest.approx(_expected_max([value, 0.0, 0.0], 3))
    report = (comparison / "report.md").read_text()
    assert "made to fail (seed 1)" in report and "the run diverged" in report
