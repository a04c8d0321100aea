"""The comparison report: the markdown, tables and figures of an equal-budget comparison
(``python -m moe_lab.compare``), rendered from :mod:`moe_lab.analysis.comparison`'s data and
statistics and written together into the comparison dir (:mod:`moe_lab.run.report_files`):

- ``report.md``: the budget and the compute each arm used, per arm the best hyperparameters, the
  best validation accuracy of the tuning and the final test accuracy mean ± SE over the fresh
  seeds, Welch's t-test, 95% CI and Hedges' g against the baseline arm, one verdict per
  comparison, and the runs that did not complete;
- ``summary.csv`` (a row per arm), ``trials.csv`` (a row per tuning trial), ``runs.csv`` (a row per
  run dir), ``best_params.json`` (``{arm: {config key: value}}``);
- figures, each as PNG and SVG: ``evp`` (expected best validation accuracy after n = 1..N trials,
  ± its standard deviation; :mod:`moe_lab.analysis.evp`), ``tuning_trace`` (every trial's score
  and the best so far) and ``final_curves`` (the final runs' validation accuracy per epoch, mean ±
  SE per arm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from moe_lab.run.report_files import COMPARE_REPORT_FILES
from moe_lab.utils.io import json_text, replace_together

from .comparison import (
    ABANDONED,
    FAILED_TRIAL_SCORE,
    ComparisonData,
    ComparisonInfo,
    comparison_info,
    load_comparison,
)
from .format import (
    DASH,
    cell,
    fmt_ci,
    fmt_duration,
    fmt_int,
    fmt_p,
    fmt_pct,
    fmt_signed,
    fmt_value,
    missing,
    table,
)
from .plots import (
    plot_accuracy_vs_flops,
    plot_curves,
    plot_evp,
    plot_trace,
    render_figure,
)
from .verdicts import (
    matched_verdicts,
    paired_section,
    replicates_section,
    verdict,
    why_section,
)

__all__ = [
    "CompareReport",
    "render_compare_files",
    "render_compare_report",
    "verdict",
    "write_compare_report",
]


@dataclass
class CompareReport:
    """What :func:`write_compare_report` wrote, and what keeps the comparison from being complete
    (``problems``: empty when every trial and every final run completed its course)."""

    paths: dict[str, Path]
    problems: list[str] = field(default_factory=list)
    summary: pd.DataFrame | None = None


# ---------------------------------------------------------------------- the report
def _spacetable(settings: dict[str, Any]) -> str:
    arm_keys = settings.get("arm_keys", {})
    rows = []
    for key, text in settings["space"].items():
        where = [arm for arm, keys in arm_keys.items() if key in keys]
        rows.append(
            [f"`{key}`", f"`{text}`", ", ".join(where) if len(where) < len(arm_keys) else "all"]
        )
    return table(["config key", "range", "arms"], rows)


def _sessions_text(sessions: list[dict[str, Any]]) -> str:
    if not sessions:
        return "not recorded (the comparison has not finished a session)"
    total = sum(float(s.get("wall_time_s") or 0) for s in sessions)
    text = fmt_duration(total)
    if len(sessions) > 1:
        text += f" over {len(sessions)} sessions (resumed)"
    return text + ", set-up and report excluded"


def _header_section(data: ComparisonData, base: str) -> list[str]:
    record = data.record
    settings = record.settings
    budget, epochs = int(settings["trials"]), settings.get("max_epochs")
    return [
        f"# Comparison report: {record.experiment or ''} ({data.dir.name})",
        "",
        f"- Comparison dir: `{data.dir}`",
        f"- Command: `{record.command}`",
        f"- Started: {record.created}",
        f"- **Budget, the same for every arm**: {budget} tuning trials × "
        f"{epochs if epochs is not None else DASH} epoch{'' if epochs == 1 else 's'}; sampler {settings['sampler']} "
        f"(seed {settings['sampler_seed']}); objective: best validation accuracy on the held-out "
        f"split; the test split is never built during tuning (trial i trains with seed i).",
        f"- Final runs: each arm's best configuration re-run with {settings['seeds']} fresh seeds "
        f"({', '.join(map(str, settings['final_seeds']))}; no tuning seed among them), each "
        "scoring the test set once.",
        f"- Baseline: `{base}`.",
        f"- Wall time of the comparison: {_sessions_text(data.sessions)}.",
        "",
        "## Search space",
        "",
        _spacetable(settings),
        "",
    ]


def _arms_section(info: ComparisonInfo) -> list[str]:
    """The per-arm results table and the best hyperparameters."""
    data, summary, best_params, labels = info.data, info.summary, info.best_params, info.labels
    header = [
        "arm",
        "params",
        "FLOPs / example",
        "trials (ok / failed)",
        "trials (random / guided)",
        "best val acc (%)",
        "final test acc (%)",
        "final best val acc (%)",
        "tuning compute",
        "final compute",
    ]
    rows = [
        [
            cell(row["label"]),
            fmt_int(row["params"]),
            fmt_int(row["flops_per_example"]),
            f"{int(row['trials_completed'])} / {int(row['trials_failed'])}",
            f"{int(row['trials_random'])} / {int(row['trials_guided'])}",
            fmt_pct(row["best_val_acc"], with_se=False),
            fmt_pct(row["test_acc_mean"], row["test_acc_se"]) + f" (n={int(row['final_n'])})",
            fmt_pct(row["final_val_acc_best_mean"], row["final_val_acc_best_se"]),
            f"{fmt_duration(row['tune_wall_time_s'])}, {int(row['tune_epochs'])} epochs",
            fmt_duration(row["final_wall_time_s"]),
        ]
        for _, row in summary.iterrows()
    ]
    lines = ["## Results per arm", "", table(header, rows, right={1, 2, 3, 4, 5, 6, 7}), ""]
    lines += [
        "Trials (random / guided): drawn at random (the sampler's start-up) / chosen by TPE from "
        "the results so far; which is which follows from the batch size, recorded in "
        "`comparison.json` and kept on resume.",
        "",
    ]
    lines += ["Best hyperparameters (the best trial of each arm; `best_params.json`):", ""]
    keys = list(data.settings["space"])
    rows = [
        [cell(labels[arm]), str(summary.loc[summary["arm"] == arm, "best_trial"].iloc[0])]
        + [fmt_value(best_params[arm][k]) if k in best_params.get(arm, {}) else DASH for k in keys]
        for arm in data.arms
        if arm in best_params
    ]
    return [*lines, table(["arm", "trial", *(f"`{k}`" for k in keys)], rows), ""]


def _baseline_section(info: ComparisonInfo, budget: int, epochs: Any) -> list[str]:
    """Every other arm against the baseline on final test accuracy, and the verdicts."""
    summary, base, labels = info.summary, info.baseline, info.labels
    n_base = int(summary.loc[summary["arm"] == base, "final_n"].iloc[0])
    lines = [f"## Against the baseline ({labels[base]}): Welch's t-test over the final seeds", ""]
    others = summary[summary["arm"] != base].assign(n_base=n_base)
    if others.empty:
        return [*lines, "Only the baseline arm: nothing to compare.", ""]
    header = ["arm", "difference (pp)", "95% CI (pp)", "p (Welch)", "Hedges' g", "n / n baseline"]
    rows = []
    for _, row in others.iterrows():
        ci = fmt_ci(row["ci_low"], row["ci_high"], signed=True)
        rows.append(
            [
                cell(row["label"]),
                DASH if missing(row["diff"]) else fmt_signed(100 * row["diff"], 2),
                ci,
                fmt_p(row["p_value"]),
                DASH if missing(row["hedges_g"]) else fmt_signed(row["hedges_g"], 2),
                f"{int(row['final_n'])} / {n_base}",
            ]
        )
    lines += [table(header, rows, right={1, 3, 4}), ""]
    lines += [
        "Welch's t-test covers only the spread of the final seeds, unpaired; the paired section "
        "above adds the test set's sampling and pairs the shared seeds.",
        "",
        "**Verdicts**",
        "",
    ]
    base_row = summary[summary["arm"] == base].iloc[0]
    replicates = info.data.replicates
    lines += [
        f"- {verdict(row, base_row, budget, epochs, replicates)}" for _, row in others.iterrows()
    ]
    return [*lines, ""]


def _evp_section(info: ComparisonInfo, budget: int) -> list[str]:
    """The expected-validation-performance table at n = 1, N/4, N/2 and N trials."""
    lines = [
        "## Expected validation performance",
        "",
        "![expected best validation accuracy vs number of trials](evp.png)",
        "",
        f"Expected best validation accuracy (%) after n trials (± std of that maximum; the figure cuts the band at 0 and 100); "
        f"n = 1 is one trial's expected score, n = {budget} the full budget.",
        "",
    ]
    points = sorted({1, max(1, budget // 4), max(1, budget // 2), budget})
    header = ["arm", *(f"n = {n}" for n in points)]
    rows = []
    for arm in info.data.arms:
        if info.scores[arm].size == 0:
            rows.append([cell(info.labels[arm]), *([DASH] * len(points))])
            continue
        curve = info.evp(arm, n_max=max(points)).set_index("n")
        rows.append(
            [cell(info.labels[arm])]
            + [
                f"{100 * curve.loc[n, 'mean']:.2f} ± {100 * curve.loc[n, 'std']:.2f}"
                for n in points
            ]
        )
    return [*lines, table(header, rows, right=set(range(1, len(header)))), ""]


def _incomplete_section(data: ComparisonData, problems: list[str]) -> list[str]:
    """Trials and final runs that did not complete, and what the report could not find."""
    trials, runs = data.trials, data.runs
    # abandoned proposals never ran and take no place in the budget: not runs, just counted
    shown = trials[trials["state"] != ABANDONED] if len(trials) else trials
    bad_trials = shown[shown["state"] != "COMPLETE"]
    bad_runs = runs[(runs["stage"] == "final") & (runs["status"] != "completed")]
    lines = [
        f"## Runs that did not complete ({len(bad_trials)} trials, {len(bad_runs)} final runs)",
        "",
    ]
    if bad_trials.empty and bad_runs.empty:
        lines += ["None.", ""]
    else:
        lines += [
            "Failed and diverged trials used up their place in the budget and were not retried; "
            f"they enter the expected-validation-performance curve with score {FAILED_TRIAL_SCORE:g}. "
            "Running trials (a stop, a full disk or a killed worker cut them off) are no result: "
            "resuming the comparison runs them to completion.",
            "",
        ]
        rows = [
            [
                cell(r["arm"]),
                f"trial {int(r['trial'])}",
                cell(r["state"].lower()),
                cell(r.get("status")),
                cell(r.get("error")),
            ]
            for _, r in bad_trials.iterrows()
        ]
        rows += [
            [
                cell(r["arm"]),
                f"final seed {r['seed']}",
                "final",
                cell(r["status"]),
                cell(r.get("detail")),
            ]
            for _, r in bad_runs.iterrows()
        ]
        lines += [table(["arm", "run", "state", "status", "detail"], rows), ""]
    n_abandoned = len(trials) - len(shown)
    if n_abandoned:
        lines += [
            f"{n_abandoned} trial(s) were cut off by a kill while they were proposed: they never "
            "ran and take no place in the budget (`trials.csv`: state ABANDONED).",
            "",
        ]
    if problems:
        lines += ["## Incomplete", "", *(f"- {p}" for p in problems), ""]
    return lines


_HOW_TO_READ = [
    "## How to read this",
    "",
    "- Every arm had the same budget: the same number of trials drawn from the same search "
    "space (where a key applies to the arm) with the same epochs per trial. Tuning only "
    "saw the validation split; the test set was scored once per final run.",
    "- Final test accuracy: mean ± SE over the fresh seeds, SE = sample std / √n. Welch's "
    "t-test (two-sided, unequal variances) against the baseline; the 95% CI is that of the "
    "difference of means, in percentage points; Hedges' g is the bias-corrected effect size "
    "(positive: the arm beats the baseline). It covers the final seeds' spread only.",
    "- Paired: every arm's final run j uses the same seed (data order) and scores the same test "
    "examples, so the difference is taken cell by cell: a paired t-test over the (replicate, "
    "seed) cells; a bootstrap that resamples replicates (independently per arm), seeds and test "
    "examples (the same for both arms) and gives the percentile interval; Holm-corrected p "
    "values across the arms compared with the baseline; and P(arm > baseline), the probability "
    "that a random run of the arm beats a random run of the baseline (ties ½; Agarwal et al. "
    '2021), with a bootstrap interval over runs. With a few seeds a large p means "not '
    'resolved", not "no difference"; the verdicts read the bootstrap interval.',
    '- Expected validation performance (Dodge et al. 2019, "Show Your Work"): the expected '
    "best validation accuracy among n trials drawn with replacement from the arm's N trial "
    "scores, E[max] = Σ v_(i) [(i/N)^n − ((i−1)/N)^n], with the standard deviation of that "
    "maximum as the band. Where the curves still rise at n = N, more tuning could change the "
    "verdict. The trials are treated as i.i.d. (exact for random search, an approximation "
    "for TPE).",
    "- Compute: the sum of the runs' wall times (runs may have run in parallel) and of their "
    "epochs.",
    "",
]


def render_compare_report(info: ComparisonInfo) -> str:
    """The comparison's report.md: settings, per-arm results, the tests against the baseline,
    expected validation performance, the figures and what did not complete."""
    data = info.data
    budget, epochs = int(data.settings["trials"]), data.settings.get("max_epochs")
    lines = [
        *_header_section(data, info.baseline),
        *_arms_section(info),
        *replicates_section(info),
        *paired_section(info),
        *_baseline_section(info, budget, epochs),
        *matched_verdicts(info),
        *_evp_section(info, budget),
        "## Tuning trace and final runs",
        "",
        "![each trial's score and the best so far](tuning_trace.png)",
        "",
        "![final runs: validation accuracy per epoch, mean ± SE](final_curves.png)",
        "",
        "![final test accuracy against FLOPs per example, with each arm's 95% interval]"
        "(accuracy_vs_flops.png)",
        "",
        *why_section(info),
        *_incomplete_section(data, info.problems),
        *_HOW_TO_READ,
    ]
    return "\n".join(lines)


def render_compare_files(info: ComparisonInfo) -> dict[str, bytes]:
    """Every file of the comparison report as bytes (keys of
    :data:`~moe_lab.run.report_files.COMPARE_REPORT_FILES`)."""
    data = info.data
    title = f"{data.record.experiment or ''} {data.dir.name}"
    figures = {
        "evp": plot_evp(info, f"Expected validation performance (± 1 std)\n{title}"),
        "trace": plot_trace(info, f"Tuning trace: each trial and the best so far\n{title}"),
        "flops": plot_accuracy_vs_flops(
            info, f"Final test accuracy against FLOPs per example\n{title}"
        ),
        "curves": plot_curves(
            info.final_curves,
            title=f"Final runs: validation accuracy, mean ± SE over seeds\n{title}",
        ),
    }
    params = [c for c in data.trials.columns if c.startswith("param:")]
    trials = pd.concat([data.trials.drop(columns=params), data.trials[params]], axis=1)
    files = {
        f"{name}_{fmt}": render_figure(figure, fmt)
        for name, figure in figures.items()
        for fmt in ("png", "svg")
    }
    files["summary_csv"] = info.summary.to_csv(index=False).encode("utf-8")
    files["trials_csv"] = trials.to_csv(index=False).encode("utf-8")
    files["runs_csv"] = data.runs.to_csv(index=False).encode("utf-8")
    files["best_params_json"] = json_text(info.best_params).encode("utf-8")
    files["report_md"] = render_compare_report(info).encode("utf-8")
    return files


def write_compare_report(comparison_dir: str | Path, baseline: str | None = None) -> CompareReport:
    """Write the comparison's report files (module docstring) into ``comparison_dir``, replacing
    a previous report as one set.

    Raises:
        ValueError: not a comparison dir, or ``baseline`` is not an arm (nothing is written).
    """
    info = comparison_info(load_comparison(comparison_dir), baseline)
    files = render_compare_files(info)
    paths = {key: info.data.dir / name for key, name in COMPARE_REPORT_FILES.items()}
    replace_together({paths[key]: content for key, content in files.items()})
    return CompareReport(paths=paths, problems=info.problems, summary=info.summary)
