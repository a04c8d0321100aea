"""Hydra callback that writes the sweep report when a multirun ends.

Wire it in a Hydra config (e.g. ``conf/hydra/default.yaml``)::

    hydra:
      callbacks:
        sweep_report:
          _target_: moe_lab.analysis.callbacks.SweepReportCallback
          baseline: null   # model name; default cnn_matched if present, else cnn

Hydra only calls ``on_multirun_end`` when every job returned: a job that raises makes the
sweeper re-raise before any callback runs, so the training task should catch its errors and
record them as ``status: failed`` in ``summary.json``.

The multirun exits non-zero (status 1) when any job did not complete, and also when the report
itself cannot be written: a sweep without its report is not a finished sweep.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from moe_lab.run.trackers import log_report_run_if_wandb

from .runs import load_runs
from .sweep_report import incomplete_jobs, write_report

_PREFIX = "[moe_lab sweep report]"


class SweepReportCallback(Callback):
    """Builds ``summary.csv``, ``report.md``, ``curves.png`` and ``curves.svg`` in
    ``hydra.sweep.dir``.

    Args:
        baseline: baseline model name for the t-tests (default ``cnn_matched``, else ``cnn``).
        fail_on_bad_runs: exit with status 1, after writing the report, when any job is failed,
            diverged, interrupted, partial, missing or invalid, so a CI job or a shell ``&&``
            notices.
    """

    def __init__(self, baseline: str | None = None, fail_on_bad_runs: bool = True) -> None:
        self.baseline = baseline
        self.fail_on_bad_runs = fail_on_bad_runs

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the report; then raise ``SystemExit(1)`` if some job did not complete or the
        report could not be written (the reason goes to stderr, with the command that rebuilds
        the report)."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            runs = load_runs(sweep_dir)
        except (OSError, ValueError) as err:
            print(f"{_PREFIX} no report: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        report_failed = False
        try:
            paths = write_report(sweep_dir, baseline=self.baseline, runs=runs)
        except Exception as err:  # say why, and still say what the runs did
            report_failed = True
            print(
                f"{_PREFIX} could not write the report ({type(err).__name__}: {err}); "
                f"rebuild it with: python -m moe_lab.report {sweep_dir}",
                file=sys.stderr,
            )
        else:
            print(f"{_PREFIX} report: {paths['report_md']}")
            print(f"{_PREFIX} curves: {paths['curves_png']} (vector: {paths['curves_svg'].name})")
            print(f"{_PREFIX} table:  {paths['summary_csv']}")
            if log_report_run_if_wandb(config, sweep_dir) is not None:
                print(f"{_PREFIX} W&B: the report is a job_type=report run in {sweep_dir}/wandb")
        bad = incomplete_jobs(runs)
        if len(bad):
            n_jobs = int((runs["status"] != "superseded").sum())
            counts = ", ".join(
                f"{n} {status}" for status, n in bad["status"].value_counts().sort_index().items()
            )
            print(
                f"{_PREFIX} {len(bad)} of {n_jobs} runs did not complete ({counts}); "
                f"they are listed in {sweep_dir / 'report.md'}",
                file=sys.stderr,
            )
        if report_failed or (len(bad) and self.fail_on_bad_runs):
            raise SystemExit(1)
