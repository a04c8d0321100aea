"""The sweep report: ``summary.csv``, ``report.md`` and ``curves.png`` in the sweep dir.

:func:`write_report` is what ``python -m moe_lab.report SWEEP_DIR`` and the Hydra callback
call. Each file is written atomically; rebuilding a report replaces the previous files (they
are derived data). Everything is computed before the first file is written, so an error (e.g.
an unknown baseline) leaves the previous report untouched.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from moe_lab.utils.io import atomic_write, atomic_write_text

from .plots import plot_curves
from .runs import NOT_COMPLETED_STATUSES, load_curves, load_runs
from .stats import DEFAULT_BASELINES, METRIC_NAMES, summarize

#: File names the report writes in the sweep dir.
REPORT_FILES: dict[str, str] = {
    "summary_csv": "summary.csv",
    "report_md": "report.md",
    "curves_png": "curves.png",
}
_DASH = "–"  # shown for undefined values (e.g. SE with n = 1)
_STATUS_ORDER = ("completed", *NOT_COMPLETED_STATUSES)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or bool(pd.isna(value))


def fmt_pct(mean: Any, se: Any) -> str:
    """``"73.12 ± 0.41"``: a fraction's mean and SE in percent, 2 decimals; "–" when undefined."""
    if _missing(mean):
        return _DASH
    return f"{100 * mean:.2f} ± {_DASH if _missing(se) else f'{100 * se:.2f}'}"


def fmt_int(value: Any) -> str:
    """``"1,250,858"``; "–" when missing."""
    return _DASH if _missing(value) else f"{round(float(value)):,}"


def fmt_float(value: Any, digits: int) -> str:
    """Fixed-point with ``digits`` decimals; "–" when missing."""
    return _DASH if _missing(value) else f"{float(value):.{digits}f}"


def fmt_p(value: Any) -> str:
    """A p-value with 3 significant digits (``"0.0312"``, ``"4.2e-06"``); "–" when undefined."""
    return _DASH if _missing(value) else f"{float(value):.3g}"


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _cell(value: Any, limit: int = 300) -> str:
    """One markdown table cell: one line, no terminal colour codes, ``|`` escaped, capped."""
    text = _DASH if _missing(value) or value == "" else str(value)
    text = " ".join(_ANSI_ESCAPE.sub("", text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(
    header: list[str], rows: list[list[str]], right_from: int = 1, left_from: int | None = None
) -> str:
    """A markdown table; columns ``right_from`` .. ``left_from - 1`` are right-aligned (numbers)."""
    left_from = len(header) if left_from is None else left_from
    align = ["---:" if right_from <= i < left_from else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _status_counts(runs: pd.DataFrame) -> str:
    counts = runs["status"].value_counts()
    parts = [f"{counts[s]} {s}" for s in _STATUS_ORDER if counts.get(s, 0)]
    return ", ".join(parts)


def _group_table(data_summary: pd.DataFrame) -> str:
    header = [
        "group",
        "n",
        "not completed",
        "best val acc (%)",
        "last val acc (%)",
        "test acc (%)",
        "params",
        "FLOPs / example",
        "epochs (mean)",
        "wall time (s, mean)",
    ]
    rows = []
    for _, row in data_summary.iterrows():
        cells = [_cell(row["group"]), str(int(row["n"])), str(int(row["n_not_completed"]))]
        for metric in ("val_acc_best", "val_acc_last", "test_acc"):
            cell = fmt_pct(row[f"{metric}_mean"], row[f"{metric}_se"])
            if row[f"{metric}_n"] != row["n"] and row[f"{metric}_n"] > 0:
                cell += f" (n={int(row[f'{metric}_n'])})"
            cells.append(cell)
        cells += [
            fmt_int(row["params"]),
            fmt_int(row["flops_per_example"]),
            fmt_float(row["epochs_mean"], 1),
            fmt_float(row["wall_time_s_mean"], 1),
        ]
        rows.append(cells)
    return _table(header, rows)


def _test_section(data_summary: pd.DataFrame, metric: str) -> str:
    baselines = sorted(data_summary.loc[data_summary["is_baseline"], "group"])
    if not baselines:
        return f"### Welch's t-test\n\nNo test: {data_summary['note'].iloc[0]}; pass `--baseline MODEL`.\n"
    metric_text = f"{METRIC_NAMES[metric]} (`{metric}`)"
    lines = [
        f"### Welch's t-test against {', '.join(f'`{b}`' for b in baselines)} on {METRIC_NAMES[metric]}",
        "",
    ]
    lines.append(f"Metric: {metric_text}, in %; difference = group − baseline.")
    if metric != "test_acc":
        lines[-1] += (
            " Test accuracy is missing for some completed run of this data, so the last validation accuracy is compared."
        )
    lines.append("")
    header = [
        "group",
        "baseline",
        "n",
        "n baseline",
        "difference (pp)",
        "95% CI (pp)",
        "t",
        "df",
        "p (two-sided)",
        "Hedges' g",
        "note",
    ]
    by_group = data_summary.set_index("group")
    rows = []
    for _, row in data_summary[~data_summary["is_baseline"]].iterrows():
        base = row["baseline_group"]
        n_base = (
            str(int(by_group.loc[base, "n"]))
            if isinstance(base, str) and base in by_group.index
            else _DASH
        )
        ci = (
            _DASH
            if _missing(row["ci_low"])
            else f"[{100 * row['ci_low']:.2f}, {100 * row['ci_high']:.2f}]"
        )
        rows.append(
            [
                _cell(row["group"]),
                _cell(base),
                str(int(row["n"])),
                n_base,
                fmt_float(100 * row["diff"] if not _missing(row["diff"]) else math.nan, 2),
                ci,
                fmt_float(row["t"], 3),
                fmt_float(row["df"], 2),
                fmt_p(row["p_value"]),
                fmt_float(row["hedges_g"], 2),
                _cell(row["note"]),
            ]
        )
    if not rows:
        return "\n".join([*lines, "Only the baseline group is present: nothing to compare.", ""])
    return "\n".join([*lines, _table(header, rows, right_from=2, left_from=len(header) - 1), ""])


def _not_completed_section(runs: pd.DataFrame) -> str:
    bad = runs[runs["status"] != "completed"]
    lines = [f"## Runs not averaged in ({len(bad)})", ""]
    if bad.empty:
        return "\n".join([*lines, "None: every run completed.", ""])
    lines.append(
        "Failed, diverged, partial (killed), missing and invalid runs never enter a mean, SE or test."
    )
    lines.append("")
    header = ["run", "data", "group", "seed", "status", "epochs", "detail"]
    rows = [
        [
            _cell(r["run_name"]),
            _cell(r["data"]),
            _cell(r["group"] if r["group"] != "?" else None),
            fmt_int(r["seed"]),
            r["status"],
            fmt_int(r["epochs"]),
            _cell(r["detail"]),
        ]
        for _, r in bad.iterrows()
    ]
    return "\n".join([*lines, _table(header, rows, right_from=len(header)), ""])


def render_report(
    runs: pd.DataFrame, summary: pd.DataFrame, sweep_dir: str | Path, baseline: str | None = None
) -> str:
    """The markdown of ``report.md`` for ``runs`` (:func:`load_runs`) and ``summary`` (:func:`summarize`)."""
    sweep = Path(sweep_dir)
    n_completed = int((runs["status"] == "completed").sum())
    baseline_text = (
        f"`{baseline}` (from --baseline)"
        if baseline is not None
        else f"{' if present in the data, else '.join(f'`{b}`' for b in DEFAULT_BASELINES)} (default)"
    )
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"- Sweep dir: `{sweep}`",
        f"- Runs found: {len(runs)} ({_status_counts(runs)}). "
        + (
            f"Only the {n_completed} completed runs enter means, SEs and tests."
            if n_completed
            else "**No run completed**: there is nothing to average or test."
        ),
        f"- Baseline: {baseline_text}; groups are compared only within the same data.",
        "",
        "![validation accuracy vs epoch, mean ± SE per group](curves.png)",
        "",
    ]
    for data, data_summary in summary.groupby("data", sort=True, dropna=False):
        lines += [f"## Data: {data}", "", "### Groups (mean ± SE over completed runs)", ""]
        lines += [_group_table(data_summary), ""]
        metric = data_summary["metric"].iloc[0]
        if (data_summary["n"] > 0).any():
            lines += [_test_section(data_summary, metric), ""]
    lines.append(_not_completed_section(runs))
    warnings_ = [
        f"- `{r['data']}` / `{r['group']}`: {r['warning']}"
        for _, r in summary.iterrows()
        if r["warning"]
    ]
    if warnings_:
        lines += ["## Warnings", "", *warnings_, ""]
    lines += [
        "## How to read this",
        "",
        "- Accuracies are in %; each cell is mean ± SE over the group's completed runs (seeds), "
        'SE = std / sqrt(n) with the sample std (ddof = 1); "–" where undefined (SE needs n ≥ 2). '
        'A cell\'s "(n=…)" counts the runs that recorded that metric when fewer than n did.',
        "- Welch's t-test (unequal variances), two-sided, group vs the baseline of the same data; "
        "df = Welch–Satterthwaite; the 95% CI is that of the difference of means in percentage points (pp).",
        "- Hedges' g = J · (mean − mean_baseline) / pooled std, J = Γ(ν/2) / (√(ν/2) Γ((ν−1)/2)), "
        "ν = n + n_baseline − 2; positive g: the group beats the baseline.",
        "- p-values are not corrected for multiple comparisons; with a handful of seeds per group a "
        'large p means "not resolved", not "no difference".',
        "",
    ]
    return "\n".join(lines)


def write_report(
    sweep_dir: str | Path,
    baseline: str | None = None,
    runs: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write ``summary.csv``, ``report.md`` and ``curves.png`` into ``sweep_dir``.

    Args:
        sweep_dir: the multirun's sweep dir (one sub-dir per job).
        baseline: baseline model name (default: ``cnn_matched`` if present, else ``cnn``).
        runs: the table from :func:`load_runs` when the caller already has it.

    Returns:
        ``{"summary_csv": path, "report_md": path, "curves_png": path}``.

    Raises:
        FileNotFoundError / ValueError: from :func:`load_runs` (no such dir, no runs) or
            :func:`summarize` (unknown baseline). No file is written then.

    A sweep whose runs all failed still gets its three files (the report lists the failures;
    the figure says there is nothing to plot), so a previous report never lingers as if current.
    """
    sweep = Path(sweep_dir).expanduser().resolve()
    if runs is None:
        runs = load_runs(sweep)
    summary = summarize(runs, baseline=baseline)
    curves = load_curves(runs)
    title = f"Validation accuracy, mean ± SE over seeds\n{sweep.name}"
    figure = plot_curves(curves, title=title)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    markdown = render_report(runs, summary, sweep, baseline)
    paths = {key: sweep / name for key, name in REPORT_FILES.items()}
    atomic_write_text(paths["summary_csv"], runs.to_csv(index=False))
    atomic_write(paths["curves_png"], lambda handle: handle.write(png.getvalue()))
    atomic_write_text(paths["report_md"], markdown)
    return paths
