"""``python -m moe_lab.report SWEEP_DIR [--baseline MODEL_OR_GROUP]`` (installed as ``moe-report``).

Rebuilds ``summary.csv``, ``report.md`` and ``curves.png`` in a sweep dir and prints their paths.

Exit status:
    0  report written; every run dir has a valid summary.json and at least one run completed
       (failed and diverged runs are results: they are listed in the report, never averaged in).
    2  error, one line on stderr:
       - no report written: the dir does not exist, holds no runs, or --baseline names a model
         with no completed run;
       - report written but the sweep is incomplete: no run completed, or some job dirs lack
         summary.json (partial/missing: killed jobs) or hold an invalid one (missing fields).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from moe_lab.analysis.runs import load_runs
from moe_lab.analysis.sweep_report import write_report


def _prog() -> str:
    return "moe-report" if Path(sys.argv[0]).name == "moe-report" else "python -m moe_lab.report"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Rebuild a sweep's summary.csv, report.md and curves.png (mean ± SE per group, "
        "Welch's t-test against the baseline, failed runs listed and never averaged in).",
        epilog="Exit status: 0 report written; 2 error (no such dir, no runs, unknown baseline, "
        "no completed run, or job dirs without a valid summary.json; the report is still written "
        "in the last two cases).",
    )
    parser.add_argument(
        "sweep_dir", metavar="SWEEP_DIR", help="the multirun's sweep dir (one sub-dir per job)"
    )
    parser.add_argument(
        "--baseline",
        metavar="MODEL",
        default=None,
        help="the baseline: a model name, or one group's label such as 'moe K=4' (default: cnn_matched if present in the data, else cnn)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        sys.stderr.write(f"{parser.prog}: error: {message}\n")
        return 2

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runs = load_runs(args.sweep_dir)
            paths = write_report(args.sweep_dir, baseline=args.baseline, runs=runs)
        except (OSError, ValueError) as err:
            return fail(str(err))
    for warning in caught:
        sys.stderr.write(f"{parser.prog}: warning: {warning.message}\n")
    for path in paths.values():
        print(path)

    statuses = runs["status"]
    report_md = paths["report_md"]
    if not (statuses == "completed").any():
        counts = ", ".join(f"{n} {s}" for s, n in statuses.value_counts().sort_index().items())
        return fail(f"none of the {len(runs)} runs completed ({counts}); see {report_md}")
    incomplete = runs[statuses.isin(["partial", "missing", "invalid"])]
    if len(incomplete):
        names = ", ".join(f"{r.run_name} ({r.status})" for r in incomplete.itertuples())
        return fail(
            f"{len(incomplete)} of {len(runs)} job dirs lack a valid summary.json: {names}; "
            f"the report lists them, see {report_md}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
