"""Per-group statistics of a sweep: mean ± standard error over seeds, Welch's t-test, Hedges' g.

Definitions (the report's "how to read this" repeats them):

- Standard error of the mean: ``SE = s / sqrt(n)`` with ``s`` the sample standard deviation
  (``ddof=1``), i.e. :func:`scipy.stats.sem`. Undefined (NaN) for ``n < 2``.
- Welch's t-test (:func:`scipy.stats.ttest_ind` with ``equal_var=False``), two-sided, of a group
  against the baseline group of the same data; ``df`` is the Welch–Satterthwaite degrees of
  freedom and the 95% confidence interval is that of the difference of means (group − baseline).
- Effect size: Hedges' g = J · (mean_a − mean_b) / s_pooled with
  ``s_pooled = sqrt(((n_a − 1) s_a² + (n_b − 1) s_b²) / (n_a + n_b − 2))`` and the exact
  small-sample correction ``J = Γ(ν/2) / (sqrt(ν/2) · Γ((ν − 1)/2))``, ``ν = n_a + n_b − 2``
  (Hedges 1981). Positive g: the group beats the baseline.

Only ``completed`` runs are used; every other status is counted (``n_not_completed``) and never
averaged in. p-values are not corrected for multiple comparisons.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from moe_lab.run.record import FINAL_STATUSES

from .runs import group_keys

#: Default baselines, in order of preference, looked up within each data.
DEFAULT_BASELINES: tuple[str, ...] = ("cnn_matched", "cnn")
#: Human names of the metrics a comparison can use.
METRIC_NAMES: dict[str, str] = {
    "test_acc": "test accuracy",
    "val_acc_last": "last validation accuracy",
    "val_acc_best": "best validation accuracy",
}
_SUMMARY_METRICS = ("val_acc_best", "val_acc_last", "test_acc")


def standard_error(values: Any) -> float:
    """``std(ddof=1) / sqrt(n)`` of the non-missing ``values`` via :func:`scipy.stats.sem`; NaN if n < 2."""
    array = pd.Series(values, dtype=float).dropna().to_numpy()
    if array.size < 2:
        return math.nan
    return float(stats.sem(array, ddof=1))


def describe(values: Any) -> tuple[float, float, int]:
    """``(mean, SE, n)`` of the non-missing ``values``: the one description every report gives
    (mean NaN when n = 0, SE NaN when n < 2)."""
    array = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna()
    mean = float(array.mean()) if len(array) else math.nan
    return mean, standard_error(array), len(array)


#: The columns :func:`welch_test` fills (besides ``note``), in every report's table.
TEST_COLUMNS: tuple[str, ...] = ("diff", "ci_low", "ci_high", "t", "df", "p_value", "hedges_g")


def hedges_g(a: Any, b: Any) -> float:
    """Hedges' g of sample ``a`` against sample ``b`` (formula in the module docstring).

    NaN when either sample has fewer than 2 values or the pooled standard deviation is 0.
    """
    a = pd.Series(a, dtype=float).dropna().to_numpy()
    b = pd.Series(b, dtype=float).dropna().to_numpy()
    n_a, n_b = a.size, b.size
    if n_a < 2 or n_b < 2:
        return math.nan
    dof = n_a + n_b - 2
    pooled_var = ((n_a - 1) * a.var(ddof=1) + (n_b - 1) * b.var(ddof=1)) / dof
    if pooled_var <= 0:
        return math.nan
    correction = math.exp(special.gammaln(dof / 2) - special.gammaln((dof - 1) / 2)) / math.sqrt(
        dof / 2
    )
    return float(correction * (a.mean() - b.mean()) / math.sqrt(pooled_var))


def exact_samples_test(test: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``test(*args, **kwargs)`` (a scipy t-test) without scipy's "precision loss" warning: runs
    that score the same test set alike give samples of equal values, which is exact here, not a
    cancellation, and the warning would reach every report's stderr."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        return test(*args, **kwargs)


def welch_test(a: Any, b: Any, confidence: float = 0.95) -> dict[str, Any]:
    """Two-sided Welch's t-test of ``a`` against ``b`` (``scipy.stats.ttest_ind(equal_var=False)``).

    Returns a dict: ``diff`` (mean(a) − mean(b)), ``ci_low``/``ci_high`` (confidence interval of
    ``diff``), ``t``, ``df`` (Welch–Satterthwaite), ``p_value``, ``hedges_g`` and ``note`` (why
    the test is undefined, else ``""``). Undefined results are NaN.
    """
    a = pd.Series(a, dtype=float).dropna().to_numpy()
    b = pd.Series(b, dtype=float).dropna().to_numpy()
    result: dict[str, Any] = dict.fromkeys(TEST_COLUMNS, math.nan)
    result["note"] = ""
    if a.size == 0 or b.size == 0:
        result["note"] = "no value to compare"
        return result
    result["diff"] = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        result["note"] = "needs ≥ 2 completed runs in each group"
        return result
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        result["note"] = "both groups have zero variance: t undefined"
        return result
    welch = exact_samples_test(stats.ttest_ind, a, b, equal_var=False)
    result.update(t_test_fields(welch, confidence))
    result["hedges_g"] = hedges_g(a, b)
    return result


def t_test_fields(test: Any, confidence: float) -> dict[str, float]:
    """``t``, ``df``, ``p_value``, ``ci_low``, ``ci_high`` of a scipy t-test result (Welch's or
    paired), the interval at ``confidence``."""
    interval = test.confidence_interval(confidence_level=confidence)
    return {
        "t": float(test.statistic),
        "df": float(test.df),
        "p_value": float(test.pvalue),
        "ci_low": float(interval.low),
        "ci_high": float(interval.high),
    }


def comparison_metric(completed: pd.DataFrame) -> str:
    """``"test_acc"`` when every completed run has a test accuracy, else ``"val_acc_last"``."""
    if len(completed) and completed["test_acc"].notna().all():
        return "test_acc"
    return "val_acc_last"


def _single_value(series: pd.Series) -> float:
    """The value shared by a group (params, FLOPs); NaN when absent. Differing values -> NaN."""
    values = series.dropna().unique()
    return float(values[0]) if len(values) == 1 else math.nan


def _pick_baseline(candidates: pd.DataFrame, row: pd.Series) -> tuple[pd.Series | None, str]:
    """The baseline group for ``row`` among ``candidates`` (rows of the summary of one data)."""
    if len(candidates) == 1:
        return candidates.iloc[0], ""
    # Same number of experts first (cnn_matched K=4 for moe K=4, whatever its top-k), then top-k.
    same_k = candidates[_equal_or_both_missing(candidates["n_experts"], row["n_experts"])]
    if len(same_k) > 1 and "top_k" in candidates.columns:
        same_k = same_k[_equal_or_both_missing(same_k["top_k"], row["top_k"])]
    if len(same_k) == 1:
        return same_k.iloc[0], ""
    return (
        None,
        f"ambiguous baseline: {sorted(candidates['group'])}; pass --baseline with one of them",
    )


def summarize(runs: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """One row per group of ``runs``: data × model × n_experts (× top_k, × routing when present)
    × the swept overrides (``context``, see :func:`~moe_lab.analysis.runs.load_runs`).

    Args:
        runs: the table from :func:`~moe_lab.analysis.runs.load_runs`.
        baseline: the baseline: a model name, or a group's label with or without its swept values
            (e.g. ``"moe K=4"``, to compare routing variants with the dense mixture); default
            ``cnn_matched`` where the data has it, else ``cnn``. A group is compared only with the
            baseline of the same data and the same swept values (``context``): ``moe K=2
            optimizer.lr=0.003`` with ``cnn_matched K=2 optimizer.lr=0.003``, never with another
            learning rate.

    Returns:
        Columns ``data, group, model, n_experts[, top_k][, routing][, context]``, ``base_group``,
        ``n`` (completed runs), ``n_not_completed`` (failed, diverged or interrupted; partial,
        missing and invalid runs belong to no group, superseded ones are not counted), ``seeds``,
        for each of ``val_acc_best``, ``val_acc_last``, ``test_acc``: ``<m>_mean``, ``<m>_se``,
        ``<m>_n``; ``params``, ``flops_per_example`` (NaN when runs of the group disagree),
        ``max_epochs`` (the budget; NaN when runs disagree), ``wall_time_s_mean``,
        ``epochs_mean``, ``is_baseline``, ``baseline_group``, ``metric`` (what the test
        compares), the :func:`welch_test` fields ``diff, ci_low, ci_high, t, df, p_value,
        hedges_g`` and ``note``, plus ``warning`` (e.g. repeated seeds inside a group).

    Raises:
        ValueError: ``baseline`` is given but no run of that model or group completed.
    """
    keys = group_keys(runs)
    completed_all = runs[runs["status"] == "completed"]
    if baseline is not None and not _matches_baseline(completed_all, baseline).any():
        present = sorted(completed_all["model"].dropna().unique())
        groups = sorted(completed_all["group"].dropna().unique())
        raise ValueError(
            f"baseline {baseline!r} has no completed run in this sweep; completed models: "
            f"{present}, groups: {groups}"
        )
    # Partial, missing and invalid runs have no trustworthy group, and superseded runs are
    # replaced by a rerun: report.md lists them apart.
    placed = runs[runs["status"].isin(FINAL_STATUSES)]
    rows = [
        _group_row(keys, key, group_runs)
        for key, group_runs in placed.groupby(keys, dropna=False, sort=True)
    ]
    summary = pd.DataFrame(rows) if rows else _empty_summary(keys)
    for column in _COMPARISON_COLUMNS:
        summary[column] = None if column in ("baseline_group", "metric", "note") else math.nan
    summary["is_baseline"] = False
    wanted = [baseline] if baseline is not None else list(DEFAULT_BASELINES)
    for data, data_summary in summary.groupby("data", dropna=False):
        completed = completed_all[
            (completed_all["data"] == data) | (completed_all["data"].isna() & pd.isna(data))
        ]
        metric = comparison_metric(completed)
        summary.loc[data_summary.index, "metric"] = metric
        for context, block in data_summary.groupby("context", dropna=False, sort=False):
            in_context = completed[completed["context"].fillna("") == context]
            _compare_block(summary, block, in_context, keys, wanted, metric, context)
    summary["is_baseline"] = summary["is_baseline"].astype(bool)
    return summary.reset_index(drop=True)


# The columns :func:`summarize` fills by testing each group against its baseline.
_COMPARISON_COLUMNS = ["is_baseline", "baseline_group", "metric", *TEST_COLUMNS, "note"]


def _group_row(keys: list[str], key: tuple, group_runs: pd.DataFrame) -> dict[str, Any]:
    """One group's row of :func:`summarize`, before the test against the baseline."""
    completed = group_runs[group_runs["status"] == "completed"]
    row: dict[str, Any] = dict(zip(keys, key, strict=True))
    row["group"] = group_runs["group"].iloc[0]
    row["base_group"] = group_runs["base_group"].iloc[0]
    if "context" not in keys:
        row["context"] = ""
    row["n"] = len(completed)
    row["n_not_completed"] = len(group_runs) - len(completed)
    row["seeds"] = " ".join(str(int(s)) for s in sorted(completed["seed"].dropna()))
    for metric in _SUMMARY_METRICS:
        row[f"{metric}_mean"], row[f"{metric}_se"], row[f"{metric}_n"] = describe(completed[metric])
    row["params"] = _single_value(completed["params"])
    row["flops_per_example"] = _single_value(completed["flops_per_example"])
    row["max_epochs"] = _single_value(completed["max_epochs"])
    for column in ("wall_time_s", "epochs"):
        values = completed[column]
        row[f"{column}_mean"] = float(values.mean()) if values.notna().any() else math.nan
    warnings_ = []
    if completed["seed"].duplicated().any():
        warnings_.append("repeated seeds inside this group")
    for column, name in (("params", "params"), ("flops_per_example", "FLOPs per example")):
        if completed[column].dropna().nunique() > 1:
            warnings_.append(f"runs disagree on {name}")
    row["warning"] = "; ".join(warnings_)
    return row


def _empty_summary(keys: list[str]) -> pd.DataFrame:
    """No run with a valid summary: an empty table with the documented columns."""
    metric_columns = [f"{m}_{s}" for m in _SUMMARY_METRICS for s in ("mean", "se", "n")]
    return pd.DataFrame(
        columns=[
            *keys,
            *([] if "context" in keys else ["context"]),
            *("group", "base_group", "n", "n_not_completed", "seeds"),
            *metric_columns,
            *("params", "flops_per_example", "max_epochs", "wall_time_s_mean"),
            *("epochs_mean", "warning"),
        ]
    )


def _compare_block(
    summary: pd.DataFrame,
    block: pd.DataFrame,
    in_context: pd.DataFrame,
    keys: list[str],
    wanted: list[str],
    metric: str,
    context: str,
) -> None:
    """Fill the comparison columns of ``summary`` for ``block``: the groups of one data and one
    set of swept values (``context``), each tested against that block's baseline on the
    completed runs ``in_context``."""
    with_runs = block[block["n"] > 0]
    chosen = next((b for b in wanted if _matches_baseline(with_runs, b).any()), None)
    if chosen is None:
        where = f" with the same swept values ({context})" if context else ""
        summary.loc[block.index, "note"] = (
            f"no baseline ({' or '.join(wanted)}) completed for this data{where}"
        )
        return
    candidates = with_runs[_matches_baseline(with_runs, chosen)]
    summary.loc[candidates.index, "is_baseline"] = True
    for index, row in block.iterrows():
        if index in candidates.index:
            summary.loc[index, "note"] = "baseline"
            summary.loc[index, "baseline_group"] = row["group"]
            continue
        base, problem = _pick_baseline(candidates, row)
        if base is None:
            summary.loc[index, "note"] = problem
            continue
        summary.loc[index, "baseline_group"] = base["group"]
        key_mask = np.ones(len(in_context), dtype=bool)
        base_mask = np.ones(len(in_context), dtype=bool)
        for key in keys:
            key_mask &= _equal_or_both_missing(in_context[key], row[key])
            base_mask &= _equal_or_both_missing(in_context[key], base[key])
        result = welch_test(in_context.loc[key_mask, metric], in_context.loc[base_mask, metric])
        for column, value in result.items():
            summary.loc[index, column] = value


def _matches_baseline(frame: pd.DataFrame, baseline: str) -> pd.Series:
    """Rows of ``frame`` (runs or groups) that ``baseline`` names: a model, a group label, or a
    group label without its swept values (``"moe K=4"`` for ``"moe K=4 optimizer.lr=0.003"``)."""
    mask = frame["model"] == baseline
    for column in ("group", "base_group"):
        if column in frame.columns:
            mask |= frame[column] == baseline
    return mask.fillna(False).astype(bool)


def _equal_or_both_missing(series: pd.Series, value: Any) -> np.ndarray:
    if pd.isna(value):
        return series.isna().to_numpy()
    return (series == value).fillna(False).to_numpy(dtype=bool)
