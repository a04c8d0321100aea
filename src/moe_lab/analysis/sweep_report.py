"""The sweep report: ``summary.csv``, ``report.md``, ``curves.png`` and ``curves.svg`` in the
sweep dir.

:func:`write_report` is what ``python -m moe_lab.report SWEEP_DIR``, ``python -m moe_lab.finish``
and the Hydra callback call. The four files are one report: they are all rendered first, written
to temporary files beside their targets, and only then renamed into place; should a rename fail,
the files already renamed are put back, so the sweep dir holds the old set or the new set, never
a mix (and an error before that, e.g. an unknown baseline, touches nothing).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from moe_lab.run.report_files import SWEEP_REPORT_FILES
from moe_lab.run.sweep import SweepPlan
from moe_lab.utils.io import replace_together

from .curves import load_curves
from .format import DASH, cell, fmt_ci, fmt_float, fmt_int, fmt_p, fmt_pct, missing, table
from .plots import figure_caption, plot_curves, render_figure
from .runs import NOT_COMPLETED_STATUSES, STATUSES, SUPERSEDED, load_runs, sweep_plans
from .stats import DEFAULT_BASELINES, METRIC_NAMES, summarize

#: File names the report writes in the sweep dir (named in :mod:`moe_lab.run.report_files`).
REPORT_FILES = SWEEP_REPORT_FILES
_STATUS_ORDER = STATUSES


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
        cells = [cell(row["group"]), str(int(row["n"])), str(int(row["n_not_completed"]))]
        for metric in ("val_acc_best", "val_acc_last", "test_acc"):
            text = fmt_pct(row[f"{metric}_mean"], row[f"{metric}_se"])
            if row[f"{metric}_n"] != row["n"] and row[f"{metric}_n"] > 0:
                text += f" (n={int(row[f'{metric}_n'])})"
            cells.append(text)
        cells += [
            fmt_int(row["params"]),
            fmt_int(row["flops_per_example"]),
            fmt_float(row["epochs_mean"], 1),
            fmt_float(row["wall_time_s_mean"], 1),
        ]
        rows.append(cells)
    return table(header, rows, right=range(1, len(header)))


def _test_section(data_summary: pd.DataFrame, metric: str) -> str:
    chosen = data_summary.loc[data_summary["is_baseline"]]
    baselines = sorted(set(chosen["base_group"].fillna(chosen["group"])))
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
            else DASH
        )
        ci = fmt_ci(row["ci_low"], row["ci_high"])
        rows.append(
            [
                cell(row["group"]),
                cell(base),
                str(int(row["n"])),
                n_base,
                fmt_float(100 * row["diff"] if not missing(row["diff"]) else math.nan, 2),
                ci,
                fmt_float(row["t"], 3),
                fmt_float(row["df"], 2),
                fmt_p(row["p_value"]),
                fmt_float(row["hedges_g"], 2),
                cell(row["note"]),
            ]
        )
    if not rows:
        return "\n".join([*lines, "Only the baseline group is present: nothing to compare.", ""])
    return "\n".join([*lines, table(header, rows, right=range(2, len(header) - 1)), ""])


def incomplete_jobs(runs: pd.DataFrame) -> pd.DataFrame:
    """The jobs that did not complete (superseded runs are not jobs of their own: a newer run of
    the same config and seed stands for them)."""
    return runs[runs["status"].isin(NOT_COMPLETED_STATUSES)]


def _not_completed_section(runs: pd.DataFrame) -> str:
    bad = incomplete_jobs(runs)
    lines = [f"## Runs not averaged in ({len(bad)})", ""]
    if bad.empty:
        return "\n".join([*lines, "None: every job completed.", ""])
    lines.append(
        "Failed, diverged, interrupted, partial (killed), missing (never started or killed before "
        "their first epoch) and invalid runs never enter a mean, SE or test."
    )
    lines.append("")
    header = ["run", "data", "group", "seed", "status", "epochs", "detail"]
    rows = [
        [
            cell(r["run_name"]),
            cell(r["data"]),
            cell(r["group"] if r["group"] != "?" else None),
            fmt_int(r["seed"]),
            r["status"],
            fmt_int(r["epochs"]),
            cell(r["detail"]),
        ]
        for _, r in bad.iterrows()
    ]
    return "\n".join([*lines, table(header, rows), ""])


def _superseded_section(runs: pd.DataFrame) -> str:
    old = runs[runs["status"] == SUPERSEDED]
    if old.empty:
        return ""
    lines = [
        f"## Superseded runs ({len(old)})",
        "",
        "Runs of a config and seed that ran again; the newest completed run (else the newest) "
        "counts, these never do.",
        "",
    ]
    header = ["run", "group", "seed", "counted instead", "detail"]
    rows = [
        [
            cell(r["run_name"]),
            cell(r["group"]),
            fmt_int(r["seed"]),
            cell(r["superseded_by"]),
            cell(r["detail"]),
        ]
        for _, r in old.iterrows()
    ]
    return "\n".join([*lines, table(header, rows), ""])


def _jobs_lines(runs: pd.DataFrame, sweep: Path, plans: list[SweepPlan]) -> list[str]:
    counted = runs[runs["status"] != SUPERSEDED]
    n_completed = int((counted["status"] == "completed").sum())
    bad = incomplete_jobs(runs)
    lines = [
        f"- Jobs: {len(counted)} ({_status_counts(counted)}). "
        + (
            f"Only the {n_completed} completed runs enter means, SEs and tests."
            if n_completed
            else "**No run completed**: there is nothing to average or test."
        )
    ]
    n_old = len(runs) - len(counted)
    if n_old:
        lines.append(
            f"- {n_old} superseded run(s): the same config and seed ran again; listed at the end."
        )
    for plan in plans:
        where = (
            plan.multirun_yaml.relative_to(sweep)
            if plan.multirun_yaml.is_relative_to(sweep)
            else plan.multirun_yaml
        )
        if plan.jobs is None:
            lines.append(f"- Planned jobs unknown: {plan.note}.")
            continue
        never = runs[
            ~runs["started"]
            & runs["run_dir"].map(lambda d, root=plan.sweep_dir: Path(d).is_relative_to(root))
        ]
        lines.append(f"- Planned: {len(plan.jobs)} jobs in `{where}`; {len(never)} never started.")
    if len(bad):
        finish = (
            f"`python -m moe_lab.finish {sweep}` reruns them in place"
            if len(plans) == 1 and plans[0].sweep_dir == sweep and plans[0].jobs is not None
            else "`python -m moe_lab.finish SWEEP_DIR` reruns those of one sweep dir in place"
        )
        lines.append(
            f"- **Incomplete**: {len(bad)} of {len(counted)} jobs did not complete; {finish}."
        )
    return lines


def render_report(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    sweep_dir: str | Path,
    baseline: str | None = None,
    plans: list[SweepPlan] | None = None,
    caption: str | None = None,
) -> str:
    """The markdown of ``report.md`` for ``runs`` (:func:`load_runs`), ``summary``
    (:func:`summarize`) and the sweep's ``plans`` (:func:`~moe_lab.analysis.runs.sweep_plans`)."""
    sweep = Path(sweep_dir)
    baseline_text = (
        f"`{baseline}` (from --baseline)"
        if baseline is not None
        else f"{' if present in the data, else '.join(f'`{b}`' for b in DEFAULT_BASELINES)} (default)"
    )
    contexts = sorted(
        {word.partition("=")[0] for text in runs["context"].fillna("") for word in text.split()}
    )
    grouping = (
        "data × model × K"
        + (f" × the swept overrides {', '.join(f'`{k}`' for k in contexts)}" if contexts else "")
        + "; the seed is what a group repeats over"
    )
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"- Sweep dir: `{sweep}`",
        *_jobs_lines(runs, sweep, plans or []),
        f"- Groups: {grouping}.",
        f"- Baseline: {baseline_text}; a group is compared only with the baseline of the same "
        "data" + (" and the same swept values." if contexts else "."),
        "",
        "![validation accuracy vs epoch, mean ± SE per group](curves.png)",
        "",
        (f"*{caption}.* " if caption else "") + "Vector copy: [curves.svg](curves.svg).",
        "",
    ]
    for data, data_summary in summary.groupby("data", sort=True, dropna=False):
        lines += [f"## Data: {data}", "", "### Groups (mean ± SE over completed runs)", ""]
        lines += [_group_table(data_summary), ""]
        metric = data_summary["metric"].iloc[0]
        if (data_summary["n"] > 0).any():
            lines += [_test_section(data_summary, metric), ""]
    lines.append(_not_completed_section(runs))
    superseded = _superseded_section(runs)
    if superseded:
        lines.append(superseded)
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
        "- Welch's t-test (unequal variances), two-sided, group vs the baseline of the same data "
        "and swept values; df = Welch–Satterthwaite; the 95% CI is that of the difference of means "
        "in percentage points (pp).",
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
    """Write ``summary.csv``, ``report.md``, ``curves.png`` (200 dpi) and ``curves.svg`` into
    ``sweep_dir``, replacing a previous report as one set (:func:`replace_together`).

    Args:
        sweep_dir: the multirun's sweep dir (one sub-dir per job), or a parent of several.
        baseline: baseline model name or group label (default: ``cnn_matched`` if present,
            else ``cnn``).
        runs: the table from :func:`load_runs` when the caller already has it.

    Returns:
        ``{"summary_csv": path, "report_md": path, "curves_png": path, "curves_svg": path}``.

    Raises:
        FileNotFoundError / ValueError: from :func:`load_runs` (no such dir, no runs) or
            :func:`summarize` (unknown baseline). No file is written then.
        OSError: a file could not be written (e.g. the disk is full); the previous report is
            left as it was.

    A sweep whose runs all failed still gets its files (the report lists the failures; the
    figure says there is nothing to plot), so a previous report never lingers as if current.
    """
    sweep = Path(sweep_dir).expanduser().resolve()
    if runs is None:
        runs = load_runs(sweep)
    plans = sweep_plans(sweep)
    summary = summarize(runs, baseline=baseline)
    curves = load_curves(runs)
    caption = figure_caption(runs)
    title = f"Validation accuracy, mean ± SE over seeds\n{sweep.name}"
    figure = plot_curves(curves, title=title, caption=caption)
    markdown = render_report(runs, summary, sweep, baseline, plans=plans, caption=caption)
    paths = {key: sweep / name for key, name in REPORT_FILES.items()}
    replace_together(
        {
            paths["summary_csv"]: runs.to_csv(index=False).encode("utf-8"),
            paths["report_md"]: markdown.encode("utf-8"),
            paths["curves_png"]: render_figure(figure, "png"),
            paths["curves_svg"]: render_figure(figure, "svg"),
        }
    )
    return paths
