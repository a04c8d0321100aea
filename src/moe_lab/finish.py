"""``python -m moe_lab.finish SWEEP_DIR`` (installed as ``moe-finish``): finish a killed sweep.

Reruns, in place, only the jobs of an existing sweep dir that lack a completed ``summary.json``,
then rebuilds the one report over all of them:

- the jobs come from the sweep's ``multirun.yaml`` (Hydra's expansion of the sweep, see
  :mod:`moe_lab.run.sweep`), so jobs that never started are known too;
- a job with ``checkpoints/last.ckpt`` (interrupted, killed or failed mid-run) is resumed:
  ``python -m moe_lab.train <job overrides> resume=<job dir>``;
- a job without one is started in the dir Hydra gave it (``hydra.run.dir=<sweep>/<num>_<override
  dirname>``); files a killed attempt left there are moved to ``<job dir>/.attempt_<time>/``;
- ``diverged`` jobs are kept as they are: a run that diverged is a result of its config and seed,
  and rerunning it until it does not would select the lucky seeds;
- up to the sweep's launcher parallelism (joblib's ``n_jobs``; 1 for the basic launcher) run at
  once, or ``--jobs N``. Each job's console output goes to ``<sweep>/.finish/<num>.log``.

Exit status: 0 when the rebuilt report has every job completed; 2 otherwise, or on an error (one
line on stderr), as ``python -m moe_lab.report``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from moe_lab.analysis.runs import load_runs
from moe_lab.report import rebuild, usage_error
from moe_lab.run.record import last_checkpoint
from moe_lab.run.sweep import MULTIRUN_FILE, PlannedJob, SweepPlan, override_identity, read_plan

#: statuses a rerun can change; ``diverged`` is a result (see the module docstring)
_RERUN = ("failed", "interrupted", "partial", "missing", "invalid")


@dataclass
class Action:
    """What finishing does for one planned job."""

    job: PlannedJob
    kind: str  # "resume" | "start"
    run_dir: Path
    was: str  # the job's status before
    command: list[str]

    def describe(self) -> str:
        verb = "resume" if self.kind == "resume" else "start"
        return f"job {self.job.num} ({self.was}): {verb} in {self.run_dir}"


def _prog() -> str:
    return "moe-finish" if Path(sys.argv[0]).name == "moe-finish" else "python -m moe_lab.finish"


def _quoted(path: Path) -> str:
    """A path as a Hydra override value: quoted, since job dirs hold ``=`` and ``,``."""
    text = str(path)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"cannot pass the path {text!r} to Hydra: it holds both kinds of quotes")


def _row_for(job: PlannedJob, runs: pd.DataFrame) -> pd.Series | None:
    """The runs-table row of ``job``: the one in the dir Hydra gave it, else one with the same
    overrides (a superseded row never stands for a job)."""
    counted = runs[runs["status"] != "superseded"]
    if job.run_dir is not None:
        same_dir = counted[counted["run_dir"] == str(job.run_dir)]
        if len(same_dir):
            return same_dir.iloc[0]
    identity = job.identity
    for _, row in counted.iterrows():
        overrides = row["overrides"]
        if isinstance(overrides, str) and override_identity(overrides.split()) == identity:
            return row
    return None


def plan_actions(plan: SweepPlan, runs: pd.DataFrame) -> tuple[list[Action], list[str]]:
    """The reruns that finish ``plan``'s sweep, and one line per job left as it is."""
    if plan.jobs is None:
        raise ValueError(f"cannot finish {plan.sweep_dir}: {plan.note}")
    actions: list[Action] = []
    kept: list[str] = []
    for job in plan.jobs:
        row = _row_for(job, runs)
        status = "missing" if row is None else str(row["status"])
        if status == "completed":
            continue
        if status not in _RERUN:
            kept.append(f"job {job.num} ({status}): kept as it is ({row['run_name']})")
            continue
        run_dir = Path(row["run_dir"]) if row is not None else job.run_dir
        if run_dir is None:
            raise ValueError(
                f"cannot finish job {job.num} of {plan.multirun_yaml}: its dir rule "
                "(hydra.sweep.subdir) needs Hydra to resolve; rerun the sweep instead"
            )
        command = [sys.executable, "-m", "moe_lab.train", *plan.config_args, *job.overrides]
        command.append(f"hydra.run.dir={_quoted(run_dir)}")
        resumable = last_checkpoint(run_dir).is_file() and status != "invalid"
        if resumable:
            command.append(f"resume={_quoted(run_dir)}")
        actions.append(Action(job, "resume" if resumable else "start", run_dir, status, command))
    return actions, kept


def _move_aside(run_dir: Path) -> Path | None:
    """Move what an earlier attempt left in ``run_dir`` into ``run_dir/.attempt_<time>/``."""
    if not run_dir.is_dir():
        return None
    leftovers = [p for p in run_dir.iterdir() if not p.name.startswith(".attempt_")]
    if not leftovers:
        return None
    target = run_dir / f".attempt_{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = run_dir / f".attempt_{time.strftime('%Y%m%d-%H%M%S')}_{suffix}"
    target.mkdir()
    for path in leftovers:
        shutil.move(str(path), str(target / path.name))
    return target


def run_actions(actions: list[Action], plan: SweepPlan, parallel: int) -> dict[int, int]:
    """Run ``actions``, ``parallel`` at a time; returns each job's exit code."""
    log_dir = plan.sweep_dir / ".finish"
    log_dir.mkdir(exist_ok=True)
    cwd = plan.cwd if plan.cwd is not None and plan.cwd.is_dir() else Path.cwd()
    pending = list(actions)
    running: list[tuple[Action, subprocess.Popen[bytes], object]] = []
    codes: dict[int, int] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                action = pending.pop(0)
                if action.kind == "start":
                    try:
                        moved = _move_aside(action.run_dir)
                    except OSError as err:
                        print(f"{action.describe()}: cannot clear its dir ({err}); skipped")
                        codes[action.job.num] = -1
                        continue
                    if moved is not None:
                        print(f"  files of the earlier attempt moved to {moved}")
                log_path = log_dir / f"{action.job.num}.log"
                log = log_path.open("ab")
                print(f"{action.describe()} (log: {log_path})", flush=True)
                process = subprocess.Popen(
                    action.command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
                )
                running.append((action, process, log))
            time.sleep(0.2)
            for entry in list(running):
                action, process, log = entry
                if process.poll() is None:
                    continue
                log.close()  # type: ignore[attr-defined]
                running.remove(entry)
                codes[action.job.num] = process.returncode
                outcome = "done" if process.returncode == 0 else f"exit {process.returncode}"
                print(f"job {action.job.num}: {outcome}", flush=True)
    except KeyboardInterrupt:
        # SIGTERM lets each run record status 'interrupted' and keep its last checkpoint
        for _, process, _ in running:
            process.send_signal(signal.SIGTERM)
        for _, process, log in running:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()  # type: ignore[attr-defined]
        raise
    return codes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Finish a killed or partly failed sweep: rerun in place only the jobs of "
        "SWEEP_DIR that lack a completed summary.json (resuming those with a checkpoint, starting "
        "those that never ran in the dir Hydra gave them), then rebuild its report.",
        epilog="Exit status: 0 every job completed; 2 some job still did not complete, or an "
        "error. Diverged jobs are kept: they are results of their config and seed.",
    )
    parser.add_argument(
        "sweep_dir", metavar="SWEEP_DIR", help="the sweep dir (holds multirun.yaml)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="jobs at once (default: the sweep launcher's n_jobs, 1 for the basic launcher)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would run, and run nothing"
    )
    parser.add_argument(
        "--baseline",
        metavar="MODEL",
        default=None,
        help="the report's baseline (as moe_lab.report)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    fail = usage_error(parser.prog)
    sweep = Path(args.sweep_dir).expanduser()
    if sweep.exists() and not sweep.is_dir():
        return fail(f"{str(sweep)!r} is a file, not a sweep dir; pass the dir the multirun wrote")
    if not sweep.is_dir():
        return fail(f"sweep dir {str(sweep)!r} does not exist; pass the multirun's sweep dir")
    sweep = sweep.resolve()
    if args.jobs is not None and args.jobs < 1:
        return fail(f"--jobs must be a positive integer, got {args.jobs}")
    try:
        plan = read_plan(sweep)
        if plan is None:
            return fail(
                f"{sweep} has no {MULTIRUN_FILE}: finish needs the dir a multirun wrote (for a "
                "parent of several sweeps, finish each sweep dir)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report lists invalid runs; no need to repeat
            runs = load_runs(sweep)
        actions, kept = plan_actions(plan, runs)
    except (OSError, ValueError) as err:
        return fail(str(err))
    for line in kept:
        print(line)
    if not actions:
        print(f"nothing to rerun: every job of {sweep} has a completed or diverged summary")
    elif args.dry_run:
        import shlex

        for action in actions:
            print(action.describe())
            print("  " + shlex.join(action.command))
        return 0
    else:
        parallel = args.jobs or plan.parallel
        print(f"finishing {len(actions)} of {len(plan.jobs or [])} jobs, {parallel} at a time")
        try:
            run_actions(actions, plan, parallel)
        except KeyboardInterrupt:
            return fail("interrupted; the runs recorded how far they got, run finish again")
    return rebuild(
        sweep, args.baseline, parser.prog, fail, error_prefix="the report could not be rebuilt: "
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
