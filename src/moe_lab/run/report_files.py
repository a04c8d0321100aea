"""The files a report writes into a sweep dir or a comparison dir, named once here.

Both reports are renderings of one stack (:mod:`moe_lab.analysis.report`); the names below are
what ``python -m moe_lab.report``, the Hydra callbacks and the tracker's report run read and
write.
"""

from __future__ import annotations

#: The table of a report (a row per run of a sweep; a row per arm of a comparison).
SUMMARY_CSV = "summary.csv"
#: The report itself.
REPORT_MD = "report.md"

#: What the sweep report writes in the sweep dir (key -> file name).
SWEEP_REPORT_FILES: dict[str, str] = {
    "summary_csv": SUMMARY_CSV,
    "report_md": REPORT_MD,
    "curves_png": "curves.png",
    "curves_svg": "curves.svg",
}
#: What the comparison report writes in the comparison dir (key -> file name).
COMPARE_REPORT_FILES: dict[str, str] = {
    "report_md": REPORT_MD,
    "summary_csv": SUMMARY_CSV,
    "trials_csv": "trials.csv",
    "runs_csv": "runs.csv",
    "best_params_json": "best_params.json",
    "evp_png": "evp.png",
    "evp_svg": "evp.svg",
    "trace_png": "tuning_trace.png",
    "trace_svg": "tuning_trace.svg",
    "curves_png": "final_curves.png",
    "curves_svg": "final_curves.svg",
    "flops_png": "accuracy_vs_flops.png",
    "flops_svg": "accuracy_vs_flops.svg",
}

__all__ = ["COMPARE_REPORT_FILES", "REPORT_MD", "SUMMARY_CSV", "SWEEP_REPORT_FILES"]
