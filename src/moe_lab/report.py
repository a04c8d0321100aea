"""``python -m moe_lab.report DIR [--baseline MODEL_OR_ARM]`` (installed as ``moe-report``).

Rebuilds the report of a sweep dir (or a parent of several sweep dirs): ``summary.csv``,
``report.md``, ``curves.png`` and ``curves.svg``; or, for a comparison dir (one holding
``comparison.json``), the comparison's report: ``report.md``, ``summary.csv``, ``trials.csv``,
``runs.csv``, ``best_params.json`` and its figures. Prints their paths. One report stack serves
both (:mod:`moe_lab.analysis.reports`); ``python -m moe_lab.compare.report`` is the same command
restricted to comparison dirs.

Exit status, sweep dir:
    0  report written and every job completed (jobs are the job dirs found plus the jobs the
       sweep's ``multirun.yaml`` planned; a run superseded by a newer run of the same config and
       seed is not a job of its own).
    2  error, one line on stderr:
       - no report written: the dir does not exist, holds no runs, or --baseline names a model
         with no completed run;
       - report written but some job did not complete: failed, diverged, interrupted, partial
         (killed), missing (never started) or invalid (a file that cannot be read or breaks the
         run record). ``python -m moe_lab.finish SWEEP_DIR`` reruns them.

Exit status, comparison dir: 0 when every trial and final run of every arm completed its course
(failed trials are results: they are listed, and counted against the budget); 1 when the
comparison is incomplete (the reasons go to stderr; resume it to finish); 2 for bad input (not a
comparison dir, an unknown baseline).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_lab.analysis.reports import COMPARISON, print_comparison_report, write_any_report


def _prog() -> str:
    return "moe-report" if Path(sys.argv[0]).name == "moe-report" else "python -m moe_lab.report"


def build_parser(prog: str | None = None, kind: str | None = None) -> argparse.ArgumentParser:
    what = "a comparison's" if kind == COMPARISON else "a sweep's or a comparison's"
    parser = argparse.ArgumentParser(
        prog=prog or _prog(),
        description=f"Rebuild {what} report from its run dirs: for a sweep summary.csv, report.md, "
        "curves.png and curves.svg (mean ± SE per group, Welch's t-test against the baseline, "
        "runs that did not complete listed and never averaged in); for a comparison also "
        "trials.csv, runs.csv, best_params.json and its figures, from its study.db.",
        epilog="Exit status: sweep: 0 report written and every job completed; 2 error (no such "
        "dir, no runs, unknown baseline; or some job failed, diverged, was interrupted, killed, "
        "never started or is invalid: the report is still written then). Comparison: 0 "
        "complete, 1 incomplete (report written), 2 bad input.",
    )
    parser.add_argument(
        "report_dir",
        metavar="COMPARISON_DIR" if kind == COMPARISON else "DIR",
        help="a multirun's sweep dir (one sub-dir per job) or a comparison dir",
    )
    parser.add_argument(
        "--baseline",
        metavar="MODEL",
        default=None,
        help="the baseline: a model name or one group's label such as 'moe K=4' (default: "
        "cnn_matched if present in the data, else cnn); for a comparison, an arm",
    )
    return parser


def usage_error(prog: str) -> Callable[[str], int]:
    """``fail(message)``: print ``prog: error: message`` to stderr and return exit status 2, as
    argparse does for bad arguments."""

    def fail(message: str) -> int:
        sys.stderr.write(f"{prog}: error: {message}\n")
        return 2

    return fail


def rebuild(
    report_dir: str | Path,
    baseline: str | None,
    prog: str,
    fail: Any,
    error_prefix: str = "",
    kind: str | None = None,
) -> int:
    """Rebuild the report, print its paths and warnings; the exit status (module docstring):
    ``fail(message)`` when no report could be written (its reason after ``error_prefix``) or
    when some job of a sweep did not complete."""
    try:
        report = write_any_report(report_dir, baseline=baseline, kind=kind)
    except (OSError, ValueError) as err:
        return fail(f"{error_prefix}{err}")
    for warning in report.warnings:
        sys.stderr.write(f"{prog}: warning: {warning}\n")
    if report.kind == COMPARISON:
        print_comparison_report(report)
        return 1 if report.problems else 0
    for path in report.paths.values():
        print(path)
    return fail(report.problems[0]) if report.problems else 0


def main(argv: list[str] | None = None, *, prog: str | None = None, kind: str | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = build_parser(prog, kind)
    args = parser.parse_args(argv)
    return rebuild(args.report_dir, args.baseline, parser.prog, usage_error(parser.prog), kind=kind)


if __name__ == "__main__":
    raise SystemExit(main())
