"""The comparison's report: the Hydra callback that writes it when a comparison ends, and
``python -m moe_lab.compare.report COMPARISON_DIR [--baseline ARM]``, which rebuilds it.

Exit status of both: 0 when every trial and final run of every arm completed its course (failed
trials are results: they are listed, and counted against the budget); 1 when the comparison is
incomplete (an arm without completed final runs, a final run that failed, unfinished trials);
2 for bad input (not a comparison dir, an unknown baseline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from moe_lab.analysis.compare_report import write_compare_report
from moe_lab.analysis.tracker_report import log_report_run_if_wandb
from moe_lab.run.comparison import STUDY_DB, is_comparison_dir

_PREFIX = "[moe_lab compare]"


def _print_report(report: Any) -> None:
    print(f"{_PREFIX} report:  {report.paths['report_md']}")
    print(
        f"{_PREFIX} figures: {report.paths['evp_png']}, {report.paths['trace_png']}, "
        f"{report.paths['curves_png']} (and .svg)"
    )
    print(f"{_PREFIX} tables:  {report.paths['summary_csv']}, {report.paths['best_params_json']}")
    for problem in report.problems:
        print(f"{_PREFIX} incomplete: {problem}", file=sys.stderr)


class CompareReportCallback(Callback):
    """Writes the comparison report (:func:`write_compare_report`) when the multirun ends.

    Args:
        baseline: the baseline arm (default: ``compare.baseline`` of the config).
        fail_on_bad_runs: exit with status 1, after writing the report, when the comparison is
            incomplete.
    """

    def __init__(
        self, baseline: str | None = None, fail_on_bad_runs: bool = True, **_ignored: Any
    ) -> None:
        self.baseline = baseline
        self.fail_on_bad_runs = fail_on_bad_runs

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        comparison_dir = Path(str(config.hydra.sweep.dir))
        if not is_comparison_dir(comparison_dir):
            return  # stopped before it started
        baseline = self.baseline or (config.get("compare") or {}).get("baseline")
        try:
            report = write_compare_report(comparison_dir, baseline=baseline)
        except Exception as err:  # the report must not hide what the runs did
            print(
                f"{_PREFIX} could not write the report ({type(err).__name__}: {err}); rebuild "
                f"it with: python -m moe_lab.compare.report {comparison_dir}",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        _print_report(report)
        if log_report_run_if_wandb(config, comparison_dir) is not None:
            print(f"{_PREFIX} W&B: the report is a job_type=report run in {comparison_dir}/wandb")
        if report.problems and self.fail_on_bad_runs:
            raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_lab.compare.report",
        description="Rebuild a comparison's report.md, summary.csv, trials.csv, best_params.json "
        f"and figures from its {STUDY_DB} and run dirs.",
    )
    parser.add_argument("comparison_dir", metavar="COMPARISON_DIR")
    parser.add_argument("--baseline", metavar="ARM", default=None, help="the baseline arm")
    args = parser.parse_args(argv)
    try:
        report = write_compare_report(args.comparison_dir, baseline=args.baseline)
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    _print_report(report)
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
