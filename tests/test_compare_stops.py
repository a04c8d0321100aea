"""A comparison survives every stop: Ctrl-C, a kill at any instant, a full disk, a signal while
its workers start. Real processes, real signals, a real (tmpfs) full disk; every end state is read
from the files on disk, and each stopped comparison is resumed to completion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import cli_env, run_module
from test_compare import (
    TINY,
    _comparison_dir,
    _env,
    _paths,
    _summaries,
    _trials,
    _wait_for,
    kill_when,
    reaped,
    start_compare,
)

pytestmark = pytest.mark.slow

SLOW = [
    "trainer.max_epochs=3",
    "+callbacks.slow._target_=compare_spy.SlowEpochs",
    "+callbacks.slow.seconds=2",
]


def _args(root: Path, *extra: str) -> list[str]:
    return [
        *(a for a in TINY if not a.startswith("trainer.max_epochs")),
        *SLOW,
        *_paths(root),
        *extra,
    ]


def _log_has(root: Path, text: str) -> bool:
    return any(text in p.read_text() for p in (root / "out").glob("compare/*/*/comparison.log"))


def _sessions(comparison: Path) -> list[dict]:
    return [json.loads(line) for line in (comparison / "sessions.jsonl").read_text().splitlines()]


def _assert_complete(comparison: Path) -> None:
    """Every trial of every arm COMPLETE, every final run completed, the report complete."""
    for arm in ("cnn", "moe"):
        trials = [t for t in _trials(comparison, arm) if not t.user_attrs.get("abandoned")]
        assert [t.state.name for t in trials] == ["COMPLETE"] * 3, arm
        tune = _summaries(comparison, "tune", arm)
        final = _summaries(comparison, "final", arm)
        assert all(s["status"] == "completed" for s in (*tune.values(), *final.values()))
        assert sorted(final) == ["seed_1000", "seed_1001"]
        for trial in trials:  # the study's record and the run's agree
            run_dir = trial.user_attrs["proposal"]["run_dir"]
            assert trial.value == tune[Path(run_dir).name]["val_acc_best"]
    assert not list(comparison.rglob("None"))
    summary = pd.read_csv(comparison / "summary.csv").set_index("arm")
    assert (summary["trials_completed"] == 3).all() and (summary["final_n"] == 2).all()
    assert "## Incomplete" not in (comparison / "report.md").read_text()


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_tuning_stops_cleanly_and_a_resume_finishes(
    tmp_path: Path, presses: int
) -> None:
    """Ctrl-C used to tell every stopped trial to Optuna as FAIL, then go on creating trials
    "not started" until the budget was gone (a second Ctrl-C was ignored); now the running trials
    record ``interrupted``, their trials stay open, nothing more is launched, the comparison exits
    130 (a second Ctrl-C: at once), and a resume runs them to completion."""
    root = tmp_path
    args = _args(root)
    with reaped(start_compare(root, args)) as proc:
        _wait_for(lambda: _log_has(root, "tune/cnn/trial_002 starts"), proc, timeout=400)
        time.sleep(2)  # the second batch is mid-run
        os.killpg(proc.pid, signal.SIGINT)
        if presses == 2:
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGINT)
        start = time.monotonic()
        _out, err = proc.communicate(timeout=240)
        stop_s = time.monotonic() - start
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    comparison = _comparison_dir(root)
    for arm in ("cnn", "moe"):
        states = [t.state.name for t in _trials(comparison, arm)]
        assert "FAIL" not in states and len(states) == 3, (arm, states)
        assert states[2] == "RUNNING"  # stopped, not a result: open for the resume
    assert not (comparison / "final").exists()  # the final runs did not start
    if presses == 1:
        for arm in ("cnn", "moe"):
            assert _summaries(comparison, "tune", arm)["trial_002"]["status"] == "interrupted"
        (session,) = _sessions(comparison)
        assert session["ended"] == "stopped" and session["wall_time_s"] > 0
        assert "## Incomplete" in (comparison / "report.md").read_text()
    else:
        assert stop_s < 10 and "a second SIGINT: stopped at once" in err
        # where the second press landed decides whether the session was recorded as stopped or
        # is left to its heartbeat (killed); either way its wall time is on disk
        recorded = (comparison / "sessions.jsonl").is_file()
        assert recorded or (comparison / ".heartbeat.json").is_file()

    resumed = run_module("moe_lab.compare", *args, f"resume={comparison}", cwd=root,
                         timeout=600, **_env(root))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_complete(comparison)
    ends = [s["ended"] for s in _sessions(comparison)]
    assert ends in (["stopped", "finished"], ["killed", "finished"])
    assert presses == 2 or ends[0] == "stopped"


def test_sigkill_right_after_a_batch_then_resume_finishes(tmp_path: Path) -> None:
    """SIGKILL the whole process group the moment the first batch's results are logged (the
    next batch is being proposed or launched): the resume finds every proposal whole or none,
    records the killed session's wall time from its heartbeat, and finishes."""
    root = tmp_path
    args = _args(root)
    proc = start_compare(root, args)
    kill_when(lambda: _log_has(root, "tune/moe/trial_001: val acc"), proc, timeout=400)
    comparison = _comparison_dir(root)
    assert (comparison / ".heartbeat.json").is_file()
    assert not (comparison / "sessions.jsonl").exists()
    resumed = run_module("moe_lab.compare", *args, f"resume={comparison}", cwd=root,
                         timeout=600, **_env(root))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_complete(comparison)
    killed, finished = _sessions(comparison)
    assert killed["ended"] == "killed" and killed["wall_time_s"] > 0
    assert finished["ended"] == "finished" and finished["resumed"]
    table = pd.read_csv(comparison / "trials.csv")
    kept = table[table["state"] != "ABANDONED"]
    assert kept["run_dir"].notna().all() and kept["seed"].notna().all()


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_a_full_disk_stops_the_comparison_and_a_resume_finishes_it(tmp_path: Path) -> None:
    """The comparison's output dir is a small tmpfs: runs that hit ENOSPC used to be recorded
    ``failed`` (a result) and a resume did nothing. Now they are ``interrupted``, named as a full
    disk, the comparison stops after the batch, and once space is freed (the tmpfs grown) the
    resume finishes every trial."""
    root = tmp_path
    out = root / "out"
    if not _can_mount_tmpfs(out):
        pytest.skip("cannot mount a tmpfs here (needs unshare -r -m)")
    args = [*(a for a in TINY), *_paths(root)]
    env = cli_env(**_env(root))
    command = " ".join([sys.executable, "-m", "moe_lab.compare", *(f"'{a}'" for a in args)])
    script = (
        f"mount -t tmpfs -o size=1200k tmpfs {out} || exit 99\n"
        f"{command} > {root}/first.out 2> {root}/first.err; echo $? > {root}/first.rc\n"
        f"mount -o remount,size=1g {out}\n"
        f"dir=$(dirname $(ls {out}/compare/*/*/comparison.json))\n"
        f"{command} resume=$dir > {root}/second.out 2> {root}/second.err; echo $? > {root}/second.rc\n"
        f"cp -a {out} {root}/kept\n"
    )
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_err = (root / "first.err").read_text()
    assert int((root / "first.rc").read_text()) == 1, first_err[-3000:]
    assert "Traceback" not in first_err
    stopped = (root / "first.out").read_text()
    assert "stopped:" in stopped and "no space left on device" in stopped
    assert int((root / "second.rc").read_text()) == 0, (root / "second.err").read_text()[-3000:]
    comparison = next((root / "kept" / "compare").glob("*/*"))
    _assert_complete(comparison)
    log = (comparison / "comparison.log").read_text()
    assert "no space left on device" in log
    shutil.rmtree(root / "kept", ignore_errors=True)


def test_sigterm_while_the_workers_start_ends_in_a_recorded_state(tmp_path: Path) -> None:
    """A SIGTERM to the whole group while joblib's workers are still starting used to end in a
    30-line TerminatedWorkerError traceback; now the comparison records the stop and exits 143."""
    root = tmp_path
    args = _args(root)
    with reaped(start_compare(root, args)) as proc:
        _wait_for(lambda: _log_has(root, "starts"), proc, timeout=300)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)
        _out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    comparison = _comparison_dir(root)
    (session,) = _sessions(comparison)
    assert session["ended"] == "stopped"
    for arm in ("cnn", "moe"):
        assert "FAIL" not in [t.state.name for t in _trials(comparison, arm)]
    resumed = run_module("moe_lab.compare", *args, f"resume={comparison}", cwd=root,
                         timeout=600, **_env(root))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_complete(comparison)
