"""One report stack for every kind of run dir: runs → statistics → rendering → files, written
together.

A dir holding ``comparison.json`` gets the comparison report
(:mod:`moe_lab.analysis.compare_report`), any other dir the sweep report
(:mod:`moe_lab.analysis.sweep_report`). Both read their runs with :func:`~moe_lab.analysis.runs.load_runs`,
describe and test them with :mod:`moe_lab.analysis.stats`, format with
:mod:`moe_lab.analysis.format`, draw with :mod:`moe_lab.analysis.plots` and replace their files
as one set (:func:`moe_lab.utils.io.replace_together`). :func:`write_any_report` is what
``python -m moe_lab.report`` (and its alias ``python -m moe_lab.compare.report``) and the Hydra
callbacks call.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from moe_lab.run.comparison import is_comparison_dir

from .compare_report import write_compare_report
from .runs import load_runs
from .sweep_report import incomplete_jobs, write_report

SWEEP, COMPARISON = "sweep", "comparison"
COMPARE_PREFIX = "[moe_lab compare]"


@dataclass
class WrittenReport:
    """A report on disk: its kind, its files, and why the runs it reports are not complete
    (``problems``, empty when they are)."""

    kind: str
    dir: Path
    paths: dict[str, Path]
    problems: list[str] = field(default_factory=list)
    #: warnings raised while reading the runs (e.g. an invalid summary.json), for the caller
    warnings: list[str] = field(default_factory=list)
    runs: pd.DataFrame | None = None


def report_kind(path: str | Path) -> str:
    return COMPARISON if is_comparison_dir(Path(path).expanduser()) else SWEEP


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


def write_any_report(
    path: str | Path, baseline: str | None = None, kind: str | None = None
) -> WrittenReport:
    """Write the report of a sweep dir or a comparison dir (``kind`` forces one).

    Raises:
        FileNotFoundError / ValueError: no such dir, no runs, not a comparison dir (for
            ``kind="comparison"``) or an unknown baseline; nothing is written then.
        OSError: a file could not be written; the previous report is left as it was.
    """
    kind = kind or report_kind(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == COMPARISON:
            report = write_compare_report(path, baseline=baseline)
            written = WrittenReport(kind, Path(path), report.paths, list(report.problems))
        else:
            runs = load_runs(path)
            paths = write_report(path, baseline=baseline, runs=runs)
            message = incomplete_message(runs, paths["report_md"])
            written = WrittenReport(
                kind, Path(path), paths, [message] if message else [], runs=runs
            )
    written.warnings = [str(w.message) for w in caught]
    return written


def print_comparison_report(report: WrittenReport) -> None:
    paths = report.paths
    print(f"{COMPARE_PREFIX} report:  {paths['report_md']}")
    print(
        f"{COMPARE_PREFIX} figures: {paths['evp_png']}, {paths['trace_png']}, "
        f"{paths['curves_png']} (and .svg)"
    )
    print(f"{COMPARE_PREFIX} tables:  {paths['summary_csv']}, {paths['best_params_json']}")
    for problem in report.problems:
        print(f"{COMPARE_PREFIX} incomplete: {problem}", file=sys.stderr)


__all__ = [
    "COMPARISON",
    "SWEEP",
    "WrittenReport",
    "incomplete_message",
    "print_comparison_report",
    "report_kind",
    "write_any_report",
]
