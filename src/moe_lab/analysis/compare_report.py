"""The report of an equal-budget comparison (``python -m moe_lab.compare``), in its dir.

Reads the comparison's record (``comparison.json``), its Optuna studies (``study.db``, one per arm)
and its run dirs (``tune/<arm>/trial_<i>/``, ``final/<arm>/seed_<s>/``, each with ``summary.json``
and ``metrics.csv``), and writes:

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

A trial that failed or diverged scores 0 in the expected-validation-performance curve (a draw
that yields no usable model) and is listed; it never enters the final statistics.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moe_lab.utils.io import atomic_write, atomic_write_json, atomic_write_text

from .evp import expected_max_curve
from .plots import _new_figure, plot_curves
from .runs import group_label, load_curves, load_runs
from .stats import standard_error, welch_test

__all__ = [
    "COMPARE_FILES",
    "FAILED_TRIAL_SCORE",
    "MARKER",
    "SESSIONS",
    "STUDY_DB",
    "CompareReport",
    "load_comparison",
    "write_compare_report",
]

#: The file that marks a comparison dir and records its settings.
MARKER = "comparison.json"
#: Optuna's SQLite storage in the comparison dir, one study per arm (study name = arm name).
STUDY_DB = "study.db"
#: One JSON line per session of the comparison process (its wall time; resumes add lines).
SESSIONS = "sessions.jsonl"
#: The score a failed or diverged trial enters the expected-validation-performance curve with.
FAILED_TRIAL_SCORE = 0.0
#: What the report writes in the comparison dir.
COMPARE_FILES: dict[str, str] = {
    "report_md": "report.md",
    "summary_csv": "summary.csv",
    "trials_csv": "trials.csv",
    "runs_csv": "runs.csv",
    "best_params_json": "best_params.json",
    "evp_png": "evp.png",
    "evp_svg": "evp.svg",
    "trace_png": "tuning_trace.png",
    "trace_svg": "tuning_trace.svg",
    "curves_png": "final_curves.png",
    "curves_svg": "final_curves.svg",
}
_DASH = "–"
_DEFAULT_BASELINES = ("cnn_matched", "cnn")


@dataclass
class CompareReport:
    """What :func:`write_compare_report` wrote, and what keeps the comparison from being complete
    (``problems``: empty when every trial and every final run completed its course)."""

    paths: dict[str, Path]
    problems: list[str] = field(default_factory=list)
    summary: pd.DataFrame | None = None


# ---------------------------------------------------------------------- reading
def _read_record(comparison_dir: Path) -> dict[str, Any]:
    marker = comparison_dir / MARKER
    if not marker.is_file():
        raise ValueError(
            f"{comparison_dir} is not a comparison dir (no {MARKER}); pass the dir that "
            "python -m moe_lab.compare printed, e.g. outputs/compare/<experiment>/<time>_<id>"
        )
    record = json.loads(marker.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or "settings" not in record:
        raise ValueError(f"{marker} is not a comparison record")
    return record


def _read_trials(comparison_dir: Path, arms: list[str]) -> pd.DataFrame:
    import optuna  # imported here: the sweep report does not need it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{comparison_dir / STUDY_DB}"
    if not (comparison_dir / STUDY_DB).is_file():
        raise ValueError(f"{comparison_dir / STUDY_DB} is missing: not a comparison dir")
    known = {s.study_name for s in optuna.get_all_study_summaries(storage=storage)}
    rows = []
    for arm in arms:
        if arm not in known:
            continue
        study = optuna.load_study(study_name=arm, storage=storage)
        for trial in study.get_trials(deepcopy=False):
            rows.append(
                {
                    "arm": arm,
                    "trial": trial.number,
                    "state": trial.state.name,
                    "status": trial.user_attrs.get("status"),
                    "value": trial.value,
                    "seed": trial.user_attrs.get("seed"),
                    "run_dir": trial.user_attrs.get("run_dir"),
                    "wall_time_s": trial.user_attrs.get("wall_time_s"),
                    "epochs": trial.user_attrs.get("epochs"),
                    "error": trial.user_attrs.get("error"),
                    "params_json": json.dumps(trial.params, sort_keys=True),
                    **{f"param:{k}": v for k, v in trial.params.items()},
                }
            )
    columns = ["arm", "trial", "state", "status", "value", "seed", "run_dir", "wall_time_s"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*columns, "params_json"])


def load_comparison(comparison_dir: str | Path) -> dict[str, Any]:
    """Everything the report reads: ``record`` (comparison.json), ``trials`` (a row per Optuna
    trial), ``runs`` (:func:`~moe_lab.analysis.runs.load_runs` of the dir, with ``stage`` and
    ``arm``) and ``arms`` (names, in order)."""
    path = Path(comparison_dir).expanduser().resolve()
    record = _read_record(path)
    arms = list(record["settings"]["arms"])
    trials = _read_trials(path, arms)
    try:
        runs = load_runs(path)
    except ValueError:  # no run dir yet
        runs = pd.DataFrame(columns=["run_name", "status", "stage", "arm", "run_dir"])
    for column in ("stage", "arm"):
        if column not in runs.columns:
            runs[column] = None
    sessions = []
    if (path / SESSIONS).is_file():
        for line in (path / SESSIONS).read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                sessions.append(json.loads(line))
    return {
        "dir": path,
        "record": record,
        "trials": trials,
        "runs": runs,
        "arms": arms,
        "sessions": sessions,
    }


# ---------------------------------------------------------------------- formatting
def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _pct(value: Any, digits: int = 2) -> str:
    return _DASH if _missing(value) else f"{100 * float(value):.{digits}f}"


def _pct_se(mean: Any, se: Any) -> str:
    if _missing(mean):
        return _DASH
    return f"{100 * mean:.2f} ± {_DASH if _missing(se) else f'{100 * se:.2f}'}"


def _signed(value: float, digits: int = 1) -> str:
    text = f"{value:+.{digits}f}"
    return text.replace("-", "−")


def _fmt_p(value: Any) -> str:
    return _DASH if _missing(value) else f"{float(value):.3g}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _cell(value: Any) -> str:
    text = _DASH if _missing(value) or value == "" else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right or set()
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt_duration(seconds: float) -> str:
    if _missing(seconds):
        return _DASH
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ---------------------------------------------------------------------- computing
def _baseline(record: dict[str, Any], arms: list[str], baseline: str | None) -> str:
    wanted = baseline if baseline is not None else record.get("baseline")
    if wanted is not None:
        if wanted not in arms:
            raise ValueError(f"baseline {wanted!r} is not one of the arms {arms}")
        return str(wanted)
    return next((b for b in _DEFAULT_BASELINES if b in arms), arms[0])


def _arm_label(arm: str, runs: pd.DataFrame) -> str:
    """``"moe K=2"`` from the arm's summaries (the report's group names), else the arm name."""
    mine = runs[(runs["arm"] == arm) & runs["status"].isin(["completed", "failed", "diverged"])]
    if mine.empty or "model" not in mine.columns:
        return arm
    first = mine.iloc[0]
    label = group_label(
        first.get("model"), first.get("n_experts"), first.get("top_k"), first.get("routing")
    )
    return label if label.split(" ")[0] == arm else f"{arm} ({label})"


def trial_scores(trials: pd.DataFrame, arm: str) -> np.ndarray:
    """The arm's finished trials' scores in trial order: the objective of completed trials,
    :data:`FAILED_TRIAL_SCORE` for failed ones (running trials are left out)."""
    mine = trials[(trials["arm"] == arm) & trials["state"].isin(["COMPLETE", "FAIL"])]
    mine = mine.sort_values("trial")
    return np.array(
        [
            float(v) if s == "COMPLETE" else FAILED_TRIAL_SCORE
            for s, v in zip(mine["state"], mine["value"], strict=True)
        ],
        dtype=float,
    )


def summarize_comparison(
    data: dict[str, Any], baseline: str | None = None
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]], list[str]]:
    """(summary: a row per arm, best_params: ``{arm: {key: value}}``, problems)."""
    record, trials, runs, arms = data["record"], data["trials"], data["runs"], data["arms"]
    settings = record["settings"]
    budget = int(settings["trials"])
    base = _baseline(record, arms, baseline)
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    best_params: dict[str, dict[str, Any]] = {}
    finals = runs[runs["stage"] == "final"]
    tunes = runs[runs["stage"] == "tune"]
    for arm in arms:
        mine = trials[trials["arm"] == arm] if len(trials) else trials
        complete = mine[mine["state"] == "COMPLETE"]
        failed = mine[mine["state"] == "FAIL"]
        running = mine[mine["state"] == "RUNNING"]
        row: dict[str, Any] = {
            "arm": arm,
            "label": _arm_label(arm, runs),
            "is_baseline": arm == base,
        }
        row["budget_trials"] = budget
        row["max_epochs"] = settings.get("max_epochs")
        row["trials_completed"] = len(complete)
        row["trials_failed"] = len(failed)
        row["trials_running"] = len(running)
        if len(complete) + len(failed) < budget:
            problems.append(
                f"arm {arm}: {len(complete) + len(failed)} of {budget} trials finished "
                "(resume the comparison to finish them)"
            )
        tune_runs = tunes[tunes["arm"] == arm]
        row["tune_wall_time_s"] = (
            float(pd.to_numeric(tune_runs["wall_time_s"]).sum()) if len(tune_runs) else 0.0
        )
        row["tune_epochs"] = (
            int(pd.to_numeric(tune_runs["epochs"]).fillna(0).sum()) if len(tune_runs) else 0
        )
        if len(complete):
            best = complete.sort_values(["value", "trial"], ascending=[False, True]).iloc[0]
            row["best_trial"] = int(best["trial"])
            row["best_val_acc"] = float(best["value"])
            row["best_params"] = best["params_json"]
            best_params[arm] = json.loads(best["params_json"])
        else:
            row["best_trial"], row["best_val_acc"], row["best_params"] = None, math.nan, None
            problems.append(f"arm {arm}: no trial completed, so there is no best configuration")
        scores = trial_scores(trials, arm) if len(trials) else np.array([])
        if scores.size:
            curve = expected_max_curve(scores)
            row["evp_n1"] = float(curve["mean"].iloc[0])
            row["evp_nN"] = float(curve["mean"].iloc[-1])
            row["evp_nN_std"] = float(curve["std"].iloc[-1])
        else:
            row["evp_n1"] = row["evp_nN"] = row["evp_nN_std"] = math.nan
        final_runs = finals[finals["arm"] == arm]
        done = final_runs[final_runs["status"] == "completed"]
        not_done = final_runs[final_runs["status"] != "completed"]
        expected_seeds = list(settings["final_seeds"]) if len(complete) else []
        row["final_n"] = len(done)
        row["final_not_completed"] = len(not_done) + max(0, len(expected_seeds) - len(final_runs))
        if row["final_not_completed"]:
            problems.append(f"arm {arm}: {len(done)} of {len(expected_seeds)} final runs completed")
        row["final_seeds"] = " ".join(str(int(s)) for s in sorted(done["seed"].dropna()))
        test = pd.to_numeric(done["test_acc"], errors="coerce").dropna()
        row["test_acc_mean"] = float(test.mean()) if len(test) else math.nan
        row["test_acc_se"] = standard_error(test)
        val = pd.to_numeric(done["val_acc_best"], errors="coerce").dropna()
        row["final_val_acc_best_mean"] = float(val.mean()) if len(val) else math.nan
        row["final_val_acc_best_se"] = standard_error(val)
        row["final_wall_time_s"] = (
            float(pd.to_numeric(final_runs["wall_time_s"]).sum()) if len(final_runs) else 0.0
        )
        params = pd.to_numeric(done["params"], errors="coerce").dropna().unique()
        row["params"] = int(params[0]) if len(params) == 1 else math.nan
        rows.append(row)
    summary = pd.DataFrame(rows)
    base_acc = _final_test_accs(finals, base)
    for column in ("diff", "ci_low", "ci_high", "t", "df", "p_value", "hedges_g"):
        summary[column] = math.nan
    summary["baseline"] = base
    summary["note"] = ""
    for index, row in summary.iterrows():
        if row["arm"] == base:
            summary.loc[index, "note"] = "baseline"
            continue
        result = welch_test(_final_test_accs(finals, row["arm"]), base_acc)
        for column, value in result.items():
            summary.loc[index, column] = value
    return summary, best_params, problems


def _final_test_accs(finals: pd.DataFrame, arm: str) -> pd.Series:
    done = finals[(finals["arm"] == arm) & (finals["status"] == "completed")]
    return pd.to_numeric(done["test_acc"], errors="coerce").dropna()


def verdict(row: pd.Series, base_label: str, budget: int, epochs: Any) -> str:
    """One sentence: e.g. "moe K=2 vs cnn_matched K=2 at an equal budget of 24 trials × 20
    epochs per arm: −4.1 pp test accuracy [95% CI −5.0, −3.2], p = 0.0002, Hedges' g = −6.1 (4
    vs 4 seeds); resolved: worse."."""
    head = f"{row['label']} vs {base_label} at an equal budget of {budget} trials"
    if not _missing(epochs):
        head += f" × {int(epochs)} epoch{'s' if int(epochs) != 1 else ''}"
    head += " per arm"
    if _missing(row["diff"]):
        return f"{head}: no test ({row['note'] or 'no completed final runs'})."
    text = f"{head}: {_signed(100 * row['diff'])} pp test accuracy"
    if _missing(row["ci_low"]):
        return f"{text}; no interval ({row['note']})."
    text += (
        f" [95% CI {_signed(100 * row['ci_low'])}, {_signed(100 * row['ci_high'])}], "
        f"p = {_fmt_p(row['p_value'])}, Hedges' g = {_signed(row['hedges_g'], 2)} "
        f"({int(row['final_n'])} vs {row['n_base']} seeds)"
    )
    if row["ci_low"] > 0:
        text += "; resolved: better."
    elif row["ci_high"] < 0:
        text += "; resolved: worse."
    else:
        text += "; not resolved at this budget (the interval contains 0)."
    return text


# ---------------------------------------------------------------------- figures
def _colors(arms: list[str]) -> dict[str, str]:
    return {arm: f"C{i % 10}" for i, arm in enumerate(arms)}


def plot_evp(
    trials: pd.DataFrame, arms: list[str], labels: dict[str, str], title: str | None = None
) -> Figure:
    """Expected best validation accuracy after n = 1..N trials per arm, ± one standard deviation
    of that maximum (Dodge et al. 2019)."""
    figure, axes = _new_figure(1, 1, 6.5, 4.5)
    axis = axes[0, 0]
    colors = _colors(arms)
    drawn = False
    for arm in arms:
        scores = trial_scores(trials, arm) if len(trials) else np.array([])
        if scores.size == 0:
            continue
        curve = expected_max_curve(scores)
        n, mean, std = (
            curve["n"].to_numpy(),
            100 * curve["mean"].to_numpy(),
            100 * curve["std"].to_numpy(),
        )
        axis.plot(
            n,
            mean,
            marker="o",
            markersize=3,
            color=colors[arm],
            label=f"{labels[arm]} (N={scores.size})",
        )
        # ± one std of the maximum, cut to the accuracies that can exist
        low, high = np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100)
        axis.fill_between(n, low, high, color=colors[arm], alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        axis.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("tuning trials n")
    axis.set_ylabel("expected best validation accuracy (%)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(True, alpha=0.3)
    if drawn:
        axis.legend(loc="lower right", fontsize="small")
    figure.suptitle(title or "Expected validation performance (± 1 std)", fontsize="medium")
    return figure


def plot_trace(
    trials: pd.DataFrame, arms: list[str], labels: dict[str, str], title: str | None = None
) -> Figure:
    """Every trial's best validation accuracy (failed trials as × at the bottom) and the best so
    far, per arm, in trial order."""
    figure, axes = _new_figure(1, 1, 6.5, 4.5)
    axis = axes[0, 0]
    colors = _colors(arms)
    for arm in arms:
        mine = (
            trials[(trials["arm"] == arm) & trials["state"].isin(["COMPLETE", "FAIL"])]
            if len(trials)
            else trials
        )
        if mine.empty:
            continue
        mine = mine.sort_values("trial")
        x = mine["trial"].to_numpy() + 1
        complete = (mine["state"] == "COMPLETE").to_numpy()
        values = pd.to_numeric(mine["value"], errors="coerce").to_numpy(dtype=float)
        axis.scatter(x[complete], 100 * values[complete], s=14, color=colors[arm], alpha=0.6)
        if (~complete).any():
            axis.scatter(x[~complete], np.zeros((~complete).sum()), marker="x", color=colors[arm])
        best = np.maximum.accumulate(np.where(complete, values, FAILED_TRIAL_SCORE))
        axis.step(x, 100 * best, where="post", color=colors[arm], label=labels[arm])
    axis.set_xlabel("trial")
    axis.set_ylabel("best validation accuracy (%)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(True, alpha=0.3)
    if len(trials):
        axis.legend(loc="lower right", fontsize="small")
    figure.suptitle(
        title or "Tuning trace: each trial (dots) and the best so far (line)", fontsize="medium"
    )
    return figure


def _figure_bytes(figure: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=120)
    return buffer.getvalue()


# ---------------------------------------------------------------------- the report
def _space_table(settings: dict[str, Any]) -> str:
    arm_keys = settings.get("arm_keys", {})
    rows = []
    for key, text in settings["space"].items():
        where = [arm for arm, keys in arm_keys.items() if key in keys]
        rows.append(
            [f"`{key}`", f"`{text}`", ", ".join(where) if len(where) < len(arm_keys) else "all"]
        )
    return _table(["config key", "range", "arms"], rows)


def _sessions_text(sessions: list[dict[str, Any]]) -> str:
    if not sessions:
        return "not recorded (the comparison has not finished a session)"
    total = sum(float(s.get("wall_time_s") or 0) for s in sessions)
    text = _fmt_duration(total)
    if len(sessions) > 1:
        text += f" over {len(sessions)} sessions (resumed)"
    return text + ", set-up and report excluded"


def _header_section(data: dict[str, Any], base: str) -> list[str]:
    record = data["record"]
    settings = record["settings"]
    budget, epochs = int(settings["trials"]), settings.get("max_epochs")
    return [
        f"# Comparison report: {record.get('experiment') or ''} ({data['dir'].name})",
        "",
        f"- Comparison dir: `{data['dir']}`",
        f"- Command: `{record.get('command', '')}`",
        f"- Started: {record.get('created', _DASH)}",
        f"- **Budget, the same for every arm**: {budget} tuning trials × "
        f"{epochs if epochs is not None else _DASH} epoch{'' if epochs == 1 else 's'}; sampler {settings['sampler']} "
        f"(seed {settings['sampler_seed']}); objective: best validation accuracy on the held-out "
        f"split; the test split is never built during tuning (trial i trains with seed i).",
        f"- Final runs: each arm's best configuration re-run with {settings['seeds']} fresh seeds "
        f"({', '.join(map(str, settings['final_seeds']))}; no tuning seed among them), each "
        "scoring the test set once.",
        f"- Baseline: `{base}`.",
        f"- Wall time of the comparison: {_sessions_text(data.get('sessions', []))}.",
        "",
        "## Search space",
        "",
        _space_table(settings),
        "",
    ]


def _arms_section(
    data: dict[str, Any], summary: pd.DataFrame, best_params: dict[str, dict[str, Any]]
) -> list[str]:
    """The per-arm results table and the best hyperparameters."""
    labels = dict(zip(summary["arm"], summary["label"], strict=True))
    header = [
        "arm",
        "params",
        "trials (ok / failed)",
        "best val acc (%)",
        "final test acc (%)",
        "final best val acc (%)",
        "tuning compute",
        "final compute",
    ]
    rows = [
        [
            _cell(row["label"]),
            _DASH if _missing(row["params"]) else f"{int(row['params']):,}",
            f"{int(row['trials_completed'])} / {int(row['trials_failed'])}",
            _pct(row["best_val_acc"]),
            _pct_se(row["test_acc_mean"], row["test_acc_se"]) + f" (n={int(row['final_n'])})",
            _pct_se(row["final_val_acc_best_mean"], row["final_val_acc_best_se"]),
            f"{_fmt_duration(row['tune_wall_time_s'])}, {int(row['tune_epochs'])} epochs",
            _fmt_duration(row["final_wall_time_s"]),
        ]
        for _, row in summary.iterrows()
    ]
    lines = ["## Results per arm", "", _table(header, rows, right={1, 2, 3, 4, 5}), ""]
    lines += ["Best hyperparameters (the best trial of each arm; `best_params.json`):", ""]
    keys = list(data["record"]["settings"]["space"])
    rows = [
        [_cell(labels[arm]), str(summary.loc[summary["arm"] == arm, "best_trial"].iloc[0])]
        + [
            _fmt_value(best_params[arm][k]) if k in best_params.get(arm, {}) else _DASH
            for k in keys
        ]
        for arm in data["arms"]
        if arm in best_params
    ]
    return [*lines, _table(["arm", "trial", *(f"`{k}`" for k in keys)], rows), ""]


def _baseline_section(summary: pd.DataFrame, base: str, budget: int, epochs: Any) -> list[str]:
    """Every other arm against the baseline on final test accuracy, and the verdicts."""
    labels = dict(zip(summary["arm"], summary["label"], strict=True))
    n_base = int(summary.loc[summary["arm"] == base, "final_n"].iloc[0])
    lines = [f"## Against the baseline ({labels[base]}), on final test accuracy", ""]
    others = summary[summary["arm"] != base].assign(n_base=n_base)
    if others.empty:
        return [*lines, "Only the baseline arm: nothing to compare.", ""]
    header = ["arm", "difference (pp)", "95% CI (pp)", "p (Welch)", "Hedges' g", "n / n baseline"]
    rows = []
    for _, row in others.iterrows():
        ci = (
            _DASH
            if _missing(row["ci_low"])
            else f"[{_signed(100 * row['ci_low'], 2)}, {_signed(100 * row['ci_high'], 2)}]"
        )
        rows.append(
            [
                _cell(row["label"]),
                _DASH if _missing(row["diff"]) else _signed(100 * row["diff"], 2),
                ci,
                _fmt_p(row["p_value"]),
                _DASH if _missing(row["hedges_g"]) else _signed(row["hedges_g"], 2),
                f"{int(row['final_n'])} / {n_base}",
            ]
        )
    lines += [_table(header, rows, right={1, 3, 4}), "", "**Verdicts**", ""]
    lines += [f"- {verdict(row, labels[base], budget, epochs)}" for _, row in others.iterrows()]
    return [*lines, ""]


def _evp_section(data: dict[str, Any], labels: dict[str, str], budget: int) -> list[str]:
    """The expected-validation-performance table at n = 1, N/4, N/2 and N trials."""
    trials = data["trials"]
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
    for arm in data["arms"]:
        scores = trial_scores(trials, arm) if len(trials) else np.array([])
        if scores.size == 0:
            rows.append([_cell(labels[arm]), *([_DASH] * len(points))])
            continue
        curve = expected_max_curve(scores, n_max=max(points)).set_index("n")
        rows.append(
            [_cell(labels[arm])]
            + [
                f"{100 * curve.loc[n, 'mean']:.2f} ± {100 * curve.loc[n, 'std']:.2f}"
                for n in points
            ]
        )
    return [*lines, _table(header, rows, right=set(range(1, len(header)))), ""]


def _incomplete_section(data: dict[str, Any], problems: list[str]) -> list[str]:
    """Trials and final runs that did not complete, and what the report could not find."""
    trials, runs = data["trials"], data["runs"]
    bad_trials = trials[trials["state"] != "COMPLETE"] if len(trials) else trials
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
            f"they enter the expected-validation-performance curve with score {FAILED_TRIAL_SCORE:g}.",
            "",
        ]
        rows = [
            [
                _cell(r["arm"]),
                f"trial {int(r['trial'])}",
                _cell(r["state"].lower()),
                _cell(r.get("status")),
                _cell(r.get("error")),
            ]
            for _, r in bad_trials.iterrows()
        ]
        rows += [
            [
                _cell(r["arm"]),
                f"final seed {r['seed']}",
                "final",
                _cell(r["status"]),
                _cell(r.get("detail")),
            ]
            for _, r in bad_runs.iterrows()
        ]
        lines += [_table(["arm", "run", "state", "status", "detail"], rows), ""]
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
    "(positive: the arm beats the baseline). p-values are not corrected for multiple "
    'comparisons, and with a few seeds a large p means "not resolved", not "no difference".',
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


def render_compare_report(
    data: dict[str, Any],
    summary: pd.DataFrame,
    best_params: dict[str, dict[str, Any]],
    problems: list[str],
) -> str:
    """The comparison's report.md: settings, per-arm results, the tests against the baseline,
    expected validation performance, the figures and what did not complete."""
    settings = data["record"]["settings"]
    budget, epochs = int(settings["trials"]), settings.get("max_epochs")
    base = summary["baseline"].iloc[0]
    labels = dict(zip(summary["arm"], summary["label"], strict=True))
    lines = [
        *_header_section(data, base),
        *_arms_section(data, summary, best_params),
        *_baseline_section(summary, base, budget, epochs),
        *_evp_section(data, labels, budget),
        "## Tuning trace and final runs",
        "",
        "![each trial's score and the best so far](tuning_trace.png)",
        "",
        "![final runs: validation accuracy per epoch, mean ± SE](final_curves.png)",
        "",
        *_incomplete_section(data, problems),
        *_HOW_TO_READ,
    ]
    return "\n".join(lines)


def write_compare_report(comparison_dir: str | Path, baseline: str | None = None) -> CompareReport:
    """Write the comparison's report files (module docstring) into ``comparison_dir``.

    Raises:
        ValueError: not a comparison dir, or ``baseline`` is not an arm (nothing is written).
    """
    data = load_comparison(comparison_dir)
    path = data["dir"]
    summary, best_params, problems = summarize_comparison(data, baseline)
    labels = dict(zip(summary["arm"], summary["label"], strict=True))
    title = f"{data['record'].get('experiment') or ''} {path.name}"
    figures = {
        "evp": plot_evp(
            data["trials"],
            data["arms"],
            labels,
            f"Expected validation performance (± 1 std)\n{title}",
        ),
        "trace": plot_trace(
            data["trials"],
            data["arms"],
            labels,
            f"Tuning trace: each trial and the best so far\n{title}",
        ),
    }
    finals = data["runs"][data["runs"]["stage"] == "final"]
    curves = (
        load_curves(finals)
        if len(finals)
        else pd.DataFrame(columns=["data", "group", "epoch", "val_acc"])
    )
    if len(curves):
        curves = curves.merge(finals[["run_dir", "arm"]], on="run_dir", how="left")
        curves["group"] = curves["arm"].map(labels)
    figures["curves"] = plot_curves(
        curves, title=f"Final runs: validation accuracy, mean ± SE over seeds\n{title}"
    )
    markdown = render_compare_report(data, summary, best_params, problems)

    paths = {key: path / name for key, name in COMPARE_FILES.items()}
    for name, figure in figures.items():
        for fmt in ("png", "svg"):
            content = _figure_bytes(figure, fmt)
            atomic_write(paths[f"{name}_{fmt}"], lambda handle, c=content: handle.write(c))
    atomic_write_text(paths["summary_csv"], summary.to_csv(index=False))
    trials = data["trials"].drop(
        columns=[c for c in data["trials"].columns if c.startswith("param:")]
    )
    trials = pd.concat([trials, data["trials"].filter(like="param:")], axis=1)
    atomic_write_text(paths["trials_csv"], trials.to_csv(index=False))
    atomic_write_text(paths["runs_csv"], data["runs"].to_csv(index=False))
    atomic_write_json(paths["best_params_json"], best_params)
    atomic_write_text(paths["report_md"], markdown)
    return CompareReport(paths=paths, problems=problems, summary=summary)
