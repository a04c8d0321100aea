"""``python -m moe_lab.report SWEEP_DIR [--baseline MODEL_OR_GROUP]`` (installed as ``moe-report``).

Rebuilds ``summary.csv``, ``report.md``, ``curves.png`` and ``curves.svg`` in a sweep dir (or a
parent of several sweep dirs) and prints their paths.

Exit status:
    0  report written and every job completed (jobs are the job dirs found plus the jobs the
       sweep's ``multirun.yaml`` planned; a run superseded by a newer run of the same config and
       seed is not a job of its own).
    2  error, one line on stderr:
       - no report written: the dir does not exist, holds no runs, or --baseline names a model
         with no completed run;
       - report written but some job did not complete: failed, diverged, interrupted, partial
         (killed), missing (never started) or invalid (a file that cannot be read or breaks the
         run record). ``python -m moe_lab.finish SWEEP_DIR`` reruns them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from moe_lab.analysis.runs import load_runs
from moe_lab.analysis.sweep_report import incomplete_jobs, write_report


def _prog() -> str:
    return "moe-report" if Path(sys.argv[0]).name == "moe-report" else "python -m moe_lab.report"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Rebuild a sweep's summary.csv, report.md, curves.png and curves.svg (mean ± "
        "SE per group, Welch's t-test against the baseline, runs that did not complete listed and "
        "never averaged in).",
        epilog="Exit status: 0 report written and every job completed; 2 error (no such dir, no "
        "runs, unknown baseline; or some job failed, diverged, was interrupted, killed, never "
        "started or is invalid: the report is still written then).",
    )
    parser.add_argument(
        "sweep_dir", metavar="SWEEP_DIR", help="the multirun's sweep dir (one sub-dir per job)"
    )
    parser.add_argument(
        "--baseline",
        metavar="MODEL",
        default=None,
        help="the baseline: a model name, or one group's label such as 'moe K=4' (default: "
        "cnn_matched if present in the data, else cnn)",
    )
    return parser


def incomplete_message(runs: pd.DataFrame, report_md: Path, limit: int = 8) -> str | None:
    """The one-line reason a sweep is not complete, or None when every job completed."""
    statuses = runs.loc[runs["status"] != "superseded", "status"]
    if not (statuses == "completed").any():
        counts = ", ".join(f"{n} {s}" for s, n in statuses.value_counts().sort_index().items())
        return f"none of the {len(statuses)} runs completed ({counts}); see {report_md}"
    bad = incomplete_jobs(runs)
    if bad.empty:
        return None
    names = [f"{r.run_name} ({r.status})" for r in bad.itertuples()]
    shown = ", ".join(names[:limit]) + (
        f", and {len(names) - limit} more" if len(names) > limit else ""
    )
    counts = ", ".join(f"{n} {s}" for s, n in bad["status"].value_counts().sort_index().items())
    return (
        f"{len(bad)} of {len(statuses)} jobs did not complete ({counts}): {shown}; "
        f"the report lists them, see {report_md}"
    )


def usage_error(prog: str) -> Callable[[str], int]:
    """``fail(message)``: print ``prog: error: message`` to stderr and return exit status 2, as
    argparse does for bad arguments."""

    def fail(message: str) -> int:
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2

    return fail


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return rebuild(args.sweep_dir, args.baseline, parser.prog, usage_error(parser.prog))


def rebuild(
    sweep_dir: str | Path, baseline: str | None, prog: str, fail: Any, error_prefix: str = ""
) -> int:
    """Rebuild the report, print its paths and warnings; the exit status (``fail(message)``
    when no report could be written, its reason after ``error_prefix``, or when some job did not
    complete)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runs = load_runs(sweep_dir)
            paths = write_report(sweep_dir, baseline=baseline, runs=runs)
        except (OSError, ValueError) as err:
            return fail(f"{error_prefix}{err}")
    for warning in caught:
        sys.stderr.write(f"{prog}: warning: {warning.message}\n")
    for path in paths.values():
        print(path)
    message = incomplete_message(runs, paths["report_md"])
    return fail(message) if message else 0


if __name__ == "__main__":
    raise SystemExit(main())
