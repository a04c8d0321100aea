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
  dir, replaced together; :func:`write_any_report` -> the report of a sweep or a comparison dir
  (one stack: runs -> statistics -> rendering -> files written together)

Never imports :mod:`moe_lab.layers` (a test enforces it): the run dirs' records
(:mod:`moe_lab.run`) are all it reads.
"""

from moe_lab.run.labels import group_label
from moe_lab.run.record import REQUIRED_FIELDS, validate_summary
from moe_lab.run.sweep import SweepPlan, read_plan

from .curves import load_curves, load_expert_usage
from .plots import plot_curves, plot_expert_usage, save_figure
from .reports import write_any_report
from .runs import NOT_COMPLETED_STATUSES, find_run_dirs, load_runs, sweep_plans
from .stats import describe, hedges_g, standard_error, summarize, welch_test
from .sweep_report import REPORT_FILES, render_report, write_report

__all__ = [
    "NOT_COMPLETED_STATUSES",
    "REPORT_FILES",
    "REQUIRED_FIELDS",
    "SweepPlan",
    "describe",
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
    "write_any_report",
    "write_report",
]
