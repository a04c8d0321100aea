"""Figures: a sweep's validation-accuracy curves (the original's figure's form) and expert usage;
a comparison's expected validation performance and tuning trace. :func:`render_figure` is the one
way every report turns a figure into file bytes.

Figures are built as :class:`matplotlib.figure.Figure` on the Agg canvas, without pyplot, so
importing this module never changes the global backend (a notebook keeps its inline backend and
can display the returned figure). Accuracies are drawn in %, as the report's tables show them;
epochs are 1-based integers; :func:`save_figure` writes PNG at 200 dpi and the vector formats
(SVG, PDF) that papers take.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from moe_lab.utils.io import atomic_write

from .comparison import FAILED_TRIAL_SCORE, ComparisonInfo


def _new_figure(n_rows: int, n_cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    return figure, axes


#: Resolution of PNG figures (print quality; the vector copy scales without limit).
PNG_DPI = 200


def render_figure(figure: Figure, fmt: str = "png", dpi: int = PNG_DPI) -> bytes:
    """``figure`` as the bytes of a ``png``, ``svg`` or ``pdf`` file (vector files carry no
    creation date, so rebuilding an unchanged report gives the same bytes)."""
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt in ("svg", "pdf") else None
    figure.savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | Path, dpi: int = PNG_DPI) -> Path:
    """Write ``figure`` to ``path`` atomically, in the format its suffix names (.png, .svg,
    .pdf)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    data = render_figure(figure, fmt, dpi)
    return atomic_write(path, lambda handle: handle.write(data))


def _join_numbers(values: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0–3, 7"``."""
    parts: list[str] = []
    values = sorted(set(values))
    start = prev = None
    for value in [*values, None]:
        if value is not None and prev is not None and value == prev + 1:
            prev = value
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
        start = prev = value
    return ", ".join(parts)


def figure_caption(runs: pd.DataFrame) -> str:
    """The caption line of a sweep's figure: data, training budget and seeds of the completed
    runs, e.g. ``"data: mnist1d · budget: 20 epochs per run · seeds: 0–3 · mean ± SE over
    seeds (n per group in the legend)"``."""
    completed = runs[runs["status"] == "completed"] if "status" in runs.columns else runs
    if completed.empty:
        return "no completed run"
    data = ", ".join(sorted(str(d) for d in completed["data"].dropna().unique())) or "?"
    budgets = sorted(
        int(e) for e in pd.to_numeric(completed["max_epochs"], errors="coerce").dropna().unique()
    )
    if not budgets:
        budget = "epochs not recorded"
    elif len(budgets) == 1:
        budget = f"{budgets[0]} epoch{'s' if budgets[0] != 1 else ''} per run"
    else:
        budget = f"{', '.join(map(str, budgets))} epochs (differs between groups)"
    seeds = _join_numbers(
        [int(s) for s in pd.to_numeric(completed["seed"], errors="coerce").dropna()]
    )
    return (
        f"data: {data} · budget: {budget} · seeds: {seeds or '?'} · "
        "mean ± SE over seeds (n per group in the legend)"
    )


def _mean_se_by_epoch(values: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean, SE (scipy.stats.sem, ddof=1; NaN for n < 2) and n of ``column`` per epoch."""

    def se(series: pd.Series) -> float:
        series = series.dropna()
        return float(stats.sem(series, ddof=1)) if len(series) >= 2 else math.nan

    return values.groupby("epoch")[column].agg(mean="mean", se=se, n="count").reset_index()


def _draw_band(
    axis: Axes,
    x: np.ndarray,
    mean: np.ndarray,
    se: np.ndarray,
    label: str,
    color: Any = None,
) -> None:
    """A mean line with a ±SE band (no band where SE is undefined, n < 2)."""
    (line,) = axis.plot(x, mean, marker="o", markersize=3, label=label, color=color)
    band = np.nan_to_num(se, nan=0.0)
    axis.fill_between(x, mean - band, mean + band, color=line.get_color(), alpha=0.25, linewidth=0)


def plot_curves(
    curves: pd.DataFrame,
    path: str | Path | None = None,
    title: str | None = None,
    metric: str = "val_acc",
    caption: str | None = None,
) -> Figure:
    """Validation accuracy (%) vs epoch, mean ± SE band per group, one subplot per data.

    Args:
        curves: long per-epoch frame from :func:`~moe_lab.analysis.curves.load_curves`; only rows
            with ``status == "completed"`` are drawn (failed runs never enter an average).
        path: when given, the figure is written there atomically (format from the suffix).
        title: figure title; default "Validation accuracy, mean ± SE over seeds".
        metric: the metrics.csv column to draw (default ``val_acc``); accuracy columns
            (``*_acc``, fractions on disk) are drawn in %.
        caption: a line under the plots, e.g. :func:`figure_caption` (data, budget, seeds).

    The x axis shows 1-based integer epochs (epoch 0 of metrics.csv is drawn at 1, as Keras
    counts). The legend names each group with its number of runs n; the band is ±1 SE where
    n ≥ 2.
    """
    if "status" in curves.columns:
        curves = curves[curves["status"] == "completed"]
    datasets = sorted(curves["data"].dropna().unique()) if len(curves) else []
    n_groups = curves.groupby("data")["group"].nunique().max() if len(curves) else 0
    # many groups (a swept grid): the legend goes beside each plot instead of over the curves
    outside = bool(n_groups and n_groups > 6)
    figure, axes = _new_figure(1, max(1, len(datasets)), 10.0 if outside else 6.5, 4.5)
    figure.suptitle(title or "Validation accuracy, mean ± SE over seeds", fontsize="medium")
    if not datasets:
        axis = axes[0, 0]
        axis.text(
            0.5,
            0.5,
            "no completed runs to plot",
            ha="center",
            va="center",
            transform=axis.transAxes,
        )
        axis.set_axis_off()
    if caption:
        figure.supxlabel(caption, fontsize="small")
    percent = metric.endswith("acc")
    scale = 100.0 if percent else 1.0
    # One colour per group across all subplots, so "cnn" is the same colour for every data.
    groups = sorted(curves["group"].dropna().unique())
    if len(groups) <= 10:
        colors = {g: f"C{i}" for i, g in enumerate(groups)}
    else:  # a swept grid: 20 distinct colours before any repeats
        palette = matplotlib.colormaps["tab20"].colors
        colors = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    for axis, data in zip(axes[0], datasets, strict=False):
        data_curves = curves[curves["data"] == data]
        last_epoch = 1
        for group, group_curves in data_curves.groupby("group", sort=True):
            by_epoch = _mean_se_by_epoch(group_curves, metric)
            last_epoch = max(last_epoch, int(by_epoch["epoch"].max()) + 1)
            n_runs = (
                group_curves["run_name"].nunique()
                if "run_name" in group_curves
                else int(by_epoch["n"].max())
            )
            _draw_band(
                axis,
                by_epoch["epoch"].to_numpy(dtype=float) + 1,
                scale * by_epoch["mean"].to_numpy(dtype=float),
                scale * by_epoch["se"].to_numpy(dtype=float),
                f"{group} (n={n_runs})",
                color=colors[group],
            )
        axis.set_title(f"data: {data}")
        axis.set_xlabel("epoch")
        name = "validation accuracy" if metric == "val_acc" else metric
        axis.set_ylabel(f"{name} (%)" if percent else name)
        # integer ticks even for a 1-epoch run (MaxNLocator alone needs 2 integers in view)
        axis.set_xlim(0.5, last_epoch + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.grid(True, alpha=0.3)
        if outside:
            axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
        else:
            axis.legend(loc="lower right", fontsize="small")
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_expert_usage(
    usage: pd.DataFrame,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Expert usage per group: mean gate per expert per layer at the last epoch, entropy vs epoch.

    Args:
        usage: tidy frame from :func:`~moe_lab.analysis.curves.load_expert_usage`.
        path: when given, the PNG is written there atomically.
        title: figure title; default "Expert usage".

    One row of panels per (data, group). Left: bars of the mean ``importance`` (mean gate
    value) of each expert in each layer at each run's last epoch, ±1 SE over runs, with a dashed
    line at the uniform share 1/K. Right: gate entropy per layer vs 1-based epoch, mean ± SE.

    Raises:
        ValueError: ``usage`` holds no importance column (only MoE runs log expert usage).
    """
    if usage.empty or not (usage["kind"] == "importance").any():
        raise ValueError(
            "no gate/<layer>/importance_<k> columns in metrics.csv: only MoE runs log expert usage; "
            "pass the output of load_expert_usage(load_curves(runs)) for a sweep with MoE runs"
        )
    panels = list(usage.groupby(["data", "group"], sort=True).groups)
    figure, axes = _new_figure(len(panels), 2, 6.0, 3.8)
    figure.suptitle(title or "Expert usage")
    for (data, group), (left, right) in zip(panels, axes, strict=True):
        rows = usage[(usage["data"] == data) & (usage["group"] == group)]
        n_runs = rows["run_name"].nunique()

        importance = rows[rows["kind"] == "importance"]
        last_epoch = importance.groupby("run_name")["epoch"].transform("max")
        last = importance[importance["epoch"] == last_epoch]
        layers = sorted(last["layer"].unique())
        experts = sorted(last["expert"].dropna().unique())
        width = 0.8 / max(1, len(experts))
        for position, expert in enumerate(experts):
            means, ses = [], []
            for layer in layers:
                values = last[(last["layer"] == layer) & (last["expert"] == expert)]["value"]
                means.append(values.mean())
                ses.append(float(stats.sem(values, ddof=1)) if len(values) >= 2 else 0.0)
            x = np.arange(len(layers)) + (position - (len(experts) - 1) / 2) * width
            left.bar(x, means, width=width, yerr=ses, capsize=2, label=f"expert {int(expert)}")
        if experts:
            left.axhline(
                1 / len(experts), color="grey", linestyle="--", linewidth=1, label="uniform 1/K"
            )
        left.set_xticks(np.arange(len(layers)), layers, rotation=30, ha="right", fontsize="small")
        left.set_ylabel("mean gate value (last epoch)")
        left.set_title(f"{data}: {group} (n={n_runs})")
        left.legend(fontsize="x-small")

        entropy = rows[rows["kind"] == "entropy"]
        for layer, layer_rows in entropy.groupby("layer", sort=True):
            by_epoch = _mean_se_by_epoch(layer_rows, "value")
            _draw_band(
                right,
                by_epoch["epoch"].to_numpy(dtype=float) + 1,
                by_epoch["mean"].to_numpy(dtype=float),
                by_epoch["se"].to_numpy(dtype=float),
                str(layer),
            )
        right.set_xlabel("epoch")
        right.set_ylabel("gate entropy")
        right.set_title(f"{data}: {group}, gate entropy")
        right.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        right.grid(True, alpha=0.3)
        if len(entropy):
            right.legend(fontsize="x-small")
        else:
            right.text(
                0.5, 0.5, "no entropy logged", ha="center", va="center", transform=right.transAxes
            )
    if path is not None:
        save_figure(figure, path)
    return figure


# -- a comparison's figures ---------------------------------------------------------------


def _colors(arms: list[str]) -> dict[str, str]:
    return {arm: f"C{i % 10}" for i, arm in enumerate(arms)}


def plot_evp(info: ComparisonInfo, title: str | None = None) -> Figure:
    """Expected best validation accuracy after n = 1..N trials per arm, ± one standard deviation
    of that maximum (Dodge et al. 2019)."""
    figure, axes = _new_figure(1, 1, 6.5, 5.5)
    axis = axes[0, 0]
    colors = _colors(info.data.arms)
    drawn = False
    for arm in info.data.arms:
        if info.scores[arm].size == 0:
            continue
        curve = info.evp(arm)
        n, mean, std = (
            curve["n"].to_numpy(),
            100 * curve["mean"].to_numpy(),
            100 * curve["std"].to_numpy(),
        )
        label = f"{info.labels[arm]} (N={info.scores[arm].size})"
        axis.plot(n, mean, marker="o", markersize=3, color=colors[arm], label=label)
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


def plot_trace(info: ComparisonInfo, title: str | None = None) -> Figure:
    """Every trial's best validation accuracy (failed trials as × at the bottom) and the best so
    far, per arm, in trial order."""
    figure, axes = _new_figure(1, 1, 6.5, 4.5)
    axis = axes[0, 0]
    trials = info.data.trials
    colors = _colors(info.data.arms)
    for arm in info.data.arms:
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
        axis.step(x, 100 * best, where="post", color=colors[arm], label=info.labels[arm])
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


def plot_accuracy_vs_flops(info: ComparisonInfo, title: str | None = None) -> Figure:
    """Each arm's final test accuracy (mean, with its 95% t interval over the final runs) against
    its forward FLOPs per example (log scale): which design buys accuracy with compute."""
    figure, axes = _new_figure(1, 1, 6.5, 5.5)
    axis = axes[0, 0]
    colors = _colors(info.data.arms)
    drawn = False
    for row in info.summary.itertuples():
        if pd.isna(row.flops_per_example) or pd.isna(row.test_acc_mean):
            continue
        half = (
            stats.t.ppf(0.975, row.final_n - 1) * row.test_acc_se
            if row.final_n > 1 and not pd.isna(row.test_acc_se)
            else 0.0
        )
        axis.errorbar(
            [row.flops_per_example], [100 * row.test_acc_mean], yerr=[100 * half], fmt="o",
            capsize=4, color=colors[row.arm], label=row.arm,
        )  # fmt: skip
        drawn = True
    if not drawn:
        axis.text(0.5, 0.5, "no completed final run", ha="center", va="center",
                  transform=axis.transAxes)  # fmt: skip
    else:
        axis.set_xscale("log")
        # arm names (a full label runs wider than the axes), in two columns under the axes
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small")
    axis.set_xlabel("forward FLOPs per example")
    axis.set_ylabel("final test accuracy (%), mean ± 95% CI")
    axis.grid(True, alpha=0.3)
    figure.suptitle(title or "Test accuracy against compute", fontsize="medium")
    return figure
