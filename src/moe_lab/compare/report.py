"""``python -m moe_lab.compare.report COMPARISON_DIR [--baseline ARM]``: an alias of
``python -m moe_lab.report`` for comparison dirs (one report stack serves sweeps and
comparisons: :mod:`moe_lab.analysis.reports`), and the Hydra callback that writes the report when
a comparison ends.

Exit status: 0 when every trial and final run of every arm completed its course (failed trials
are results: they are listed, and counted against the budget); 1 when the comparison is
incomplete (an arm without completed final runs, a final run that failed, unfinished trials); 2
for bad input (not a comparison dir, an unknown baseline).
"""

from __future__ import annotations

from moe_lab.analysis.callbacks import CompareReportCallback
from moe_lab.analysis.reports import COMPARISON
from moe_lab.report import main as _report_main

__all__ = ["CompareReportCallback", "main"]


def main(argv: list[str] | None = None) -> int:
    return _report_main(argv, prog="python -m moe_lab.compare.report", kind=COMPARISON)


if __name__ == "__main__":
    raise SystemExit(main())
