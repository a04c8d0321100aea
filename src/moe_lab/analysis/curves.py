"""Per-epoch curves of the runs in a runs table (from ``metrics.csv``), and the MoE layers'
expert-usage columns as a tidy frame."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from moe_lab.run.record import GATE_COLUMN, METRICS_FILE

from .run_rows import CURVE_COLUMNS


def load_curves(runs: pd.DataFrame, *, statuses: Iterable[str] = ("completed",)) -> pd.DataFrame:
    """Per-epoch metrics of the runs in ``runs`` (from :func:`load_runs`), in long format.

    One row per (run, epoch): ``run_name``, ``run_dir``, ``group``, ``data``, ``model``,
    ``n_experts``, ``top_k``, ``seed``, ``status``, then every column of the run's
    ``metrics.csv`` (``epoch`` 0-based, ``step``, ``train_loss``, ``train_acc``, ``val_loss``,
    ``val_acc``, ``lr``, ``gate/...``). Only runs whose status is in ``statuses`` are read
    (default: completed runs, the only ones any average may use).

    Raises:
        ValueError: a run's ``metrics.csv`` lacks the ``epoch`` or ``val_acc`` column.

    A selected run without ``metrics.csv`` is skipped with a warning.
    """
    wanted = set(statuses)
    id_columns = [
        "run_name",
        "run_dir",
        "group",
        "data",
        "model",
        "n_experts",
        "top_k",
        "seed",
        "status",
    ]
    frames = []
    for _, run in runs[runs["status"].isin(wanted)].iterrows():
        path = Path(run["run_dir"]) / METRICS_FILE
        if not path.is_file():
            warnings.warn(
                f"run {run['run_name']!r} has status {run['status']!r} but no {path}", stacklevel=2
            )
            continue
        try:
            metrics = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            continue
        missing = [c for c in CURVE_COLUMNS if c not in metrics.columns]
        if missing:
            raise ValueError(
                f"{path}: metrics.csv missing columns {missing} (the columns are MetricsRow's, "
                "moe_lab/run/record.py)"
            )
        # the run's identity in front, as one block (one insert per column fragments a frame
        # of many metric columns, and pandas warns on every report)
        ids = pd.DataFrame({c: [run[c]] * len(metrics) for c in id_columns}, index=metrics.index)
        frames.append(pd.concat([ids, metrics.drop(columns=id_columns, errors="ignore")], axis=1))
    if not frames:
        return pd.DataFrame(columns=[*id_columns, "epoch", "val_acc"])
    return pd.concat(frames, ignore_index=True)


def load_expert_usage(curves: pd.DataFrame) -> pd.DataFrame:
    """The ``gate/<layer>/...`` columns of ``curves`` (from :func:`load_curves`) as a tidy frame.

    One row per (run, epoch, layer, quantity, expert): ``run_name``, ``group``, ``data``,
    ``seed``, ``epoch`` (0-based), ``layer``, ``kind`` (``"importance"``: mean gate value of the
    expert; ``"load"``: share of routed inputs; ``"entropy"``: gate entropy; ``"dead"``: fraction
    of unused experts; ``"dropped"``: fraction of assignments over capacity), ``expert`` (index k,
    ``<NA>`` for the scalars) and ``value``. Rows whose value is missing (non-MoE runs) are dropped.
    """
    gate_columns = [c for c in curves.columns if isinstance(c, str) and GATE_COLUMN.match(c)]
    id_columns = [c for c in ("run_name", "group", "data", "seed", "epoch") if c in curves.columns]
    if not gate_columns:
        return pd.DataFrame(columns=[*id_columns, "layer", "kind", "expert", "value"])
    tidy = curves[id_columns + gate_columns].melt(
        id_vars=id_columns, var_name="column", value_name="value"
    )
    tidy = tidy.dropna(subset=["value"])
    parsed = tidy["column"].str.extract(GATE_COLUMN)
    tidy["layer"] = parsed["layer"]
    tidy["kind"] = parsed["kind"].fillna(parsed["scalar"])
    tidy["expert"] = pd.to_numeric(parsed["expert"]).astype("Int64")
    tidy["value"] = tidy["value"].astype(float)
    return tidy.drop(columns="column").reset_index(drop=True)


__all__ = ["load_curves", "load_expert_usage"]
