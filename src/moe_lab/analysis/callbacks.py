"""The Hydra callback that writes a multirun's report when it ends: the sweep report for a sweep,
the comparison report for a comparison (one report stack, :mod:`moe_lab.analysis.reports`).

Wire it in a Hydra config (``conf/hydra/default.yaml``, ``conf/hydra/compare.yaml``)::

    hydra:
      callbacks:
        sweep_report:
          _target_: moe_lab.analysis.callbacks.SweepReportCallback
          baseline: null   # model name; default cnn_matched if present, else cnn

Hydra only calls ``on_multirun_end`` when every job returned: a job that raises makes the
sweeper re-raise before any callback runs, so the training task catches its errors and records
them as ``status: failed`` in ``summary.json``.

The multirun exits non-zero (status 1) when any job did not complete (``fail_on_bad_runs``), and
also when the report itself cannot be written: a sweep without its report is not finished.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from moe_lab.run.comparison import is_comparison_dir
from moe_lab.run.report_files import REPORT_MD
from moe_lab.run.signals import received_signal
from moe_lab.run.trackers import log_report_run_if_wandb

from .reports import COMPARISON, SWEEP, print_comparison_report, write_any_report
from .runs import load_runs
from .sweep_report import incomplete_jobs


class ReportCallback(Callback):
    """Writes the report of ``hydra.sweep.dir`` when the multirun ends.

    Args:
        baseline: the baseline (a model or group label for a sweep, an arm for a comparison;
            default: ``cnn_matched`` if present, else ``cnn``, or ``compare.baseline``).
        fail_on_bad_runs: exit with status 1, after writing the report, when the runs are not
            complete, so a CI job or a shell ``&&`` notices.
    """

    kind = SWEEP
    prefix = "[moe_lab sweep report]"
    rebuild_command = "python -m moe_lab.report"

    def __init__(
        self, baseline: str | None = None, fail_on_bad_runs: bool = True, **_ignored: Any
    ) -> None:
        self.baseline = baseline
        self.fail_on_bad_runs = fail_on_bad_runs

    def _baseline(self, config: DictConfig) -> str | None:
        return self.baseline

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report_dir = Path(str(config.hydra.sweep.dir))
        try:
            report = write_any_report(report_dir, self._baseline(config), kind=self.kind)
        except Exception as err:  # say why, and still say what the runs did
            print(
                f"{self.prefix} could not write the report ({type(err).__name__}: {err}); "
                f"rebuild it with: {self.rebuild_command} {report_dir}",
                file=sys.stderr,
            )
            self._say_what_the_runs_did(report_dir)
            raise SystemExit(1) from None
        self._print(report)
        if log_report_run_if_wandb(config, report_dir) is not None:
            print(f"{self.prefix} W&B: the report is a job_type=report run in {report_dir}/wandb")
        # a signal stopped the multirun: SweepSignals, called after this, exits with 128 + signal
        if report.problems and self.fail_on_bad_runs and received_signal() is None:
            raise SystemExit(1)

    def _print(self, report: Any) -> None:
        paths = report.paths
        print(f"{self.prefix} report: {paths['report_md']}")
        print(f"{self.prefix} curves: {paths['curves_png']} (vector: {paths['curves_svg'].name})")
        print(f"{self.prefix} table:  {paths['summary_csv']}")
        self._say_what_the_runs_did(report.dir, report.runs)

    def _say_what_the_runs_did(self, report_dir: Path, runs: Any = None) -> None:
        try:
            runs = load_runs(report_dir) if runs is None else runs
        except (OSError, ValueError) as err:
            print(f"{self.prefix} no report: {err}", file=sys.stderr)
            return
        bad = incomplete_jobs(runs)
        if len(bad):
            n_jobs = int((runs["status"] != "superseded").sum())
            counts = ", ".join(
                f"{n} {status}" for status, n in bad["status"].value_counts().sort_index().items()
            )
            print(
                f"{self.prefix} {len(bad)} of {n_jobs} runs did not complete ({counts}); "
                f"they are listed in {report_dir / REPORT_MD}",
                file=sys.stderr,
            )


class SweepReportCallback(ReportCallback):
    """The sweep report (``summary.csv``, ``report.md``, ``curves.png``, ``curves.svg``)."""


class CompareReportCallback(ReportCallback):
    """The comparison report (:mod:`moe_lab.analysis.compare_report`); the baseline defaults to
    the config's ``compare.baseline``."""

    kind = COMPARISON
    prefix = "[moe_lab compare]"
    rebuild_command = "python -m moe_lab.compare.report"

    def _baseline(self, config: DictConfig) -> str | None:
        return self.baseline or (config.get("compare") or {}).get("baseline")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_comparison_dir(Path(str(config.hydra.sweep.dir))):
            return  # stopped before it started
        super().on_multirun_end(config, **kwargs)

    def _print(self, report: Any) -> None:
        print_comparison_report(report)

    def _say_what_the_runs_did(self, report_dir: Path, runs: Any = None) -> None:
        pass  # the comparison report's problems say it


__all__ = ["CompareReportCallback", "ReportCallback", "SweepReportCallback"]
