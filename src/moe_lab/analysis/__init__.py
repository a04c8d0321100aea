"""Reading sweeps and reporting them honestly: mean ± SE over seeds, Welch's t-tests, figures.

Imports pandas, scipy and matplotlib (and Hydra's override parser to read ``multirun.yaml``; the
Hydra callback lives in
:mod:`moe_lab.analysis.callbacks` and is not imported here).

- :func:`load_runs` -> one row per job, planned or found (``status`` completed/failed/diverged/
  interrupted/partial/missing/invalid/superseded); :func:`read_plan` -> the jobs of a sweep
- :func:`load_curves` -> per-epoch metrics, long format; :func:`load_expert_usage` -> gate columns
- :func:`summarize` -> per-group mean ± SE, params, FLOPs, Welch's t-test and Hedges' g vs the baseline
- :func:`plot_curves`, :func:`plot_expert_usage` -> matplotlib figures (Agg canvas)
- :func:`write_report` -> ``summary.csv``, ``report.md``, ``curves.png``, ``curves.svg`` in the sweep
  dir, replaced together
"""

from moe_lab.run.record import REQUIRED_FIELDS, validate_summary
from moe_lab.run.sweep import SweepPlan, read_plan

from .plots import plot_curves, plot_expert_usage, save_figure
from .runs import (
    NOT_COMPLETED_STATUSES,
    find_run_dirs,
    group_label,
    load_curves,
    load_expert_usage,
    load_runs,
    sweep_plans,
)
from .stats import hedges_g, standard_error, summarize, welch_test
from .sweep_report import REPORT_FILES, render_report, write_report

__all__ = [
    "NOT_COMPLETED_STATUSES",
    "REPORT_FILES",
    "REQUIRED_FIELDS",
    "SweepPlan",
    "find_run_dirs",
    "group_label",
    "hedges_g",
    "load_curves",
    "load_expert_usage",
    "load_runs",
    "plot_curves",
    "plot_expert_usage",
    "read_plan",
    "render_report",
    "save_figure",
    "standard_error",
    "summarize",
    "sweep_plans",
    "validate_summary",
    "welch_test",
    "write_report",
]
