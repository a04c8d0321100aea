"""Why an arm wins or loses: its final runs' fit (train against validation accuracy at the last
epoch: under- or over-fitting), each layer's activation scale at initialisation and at the end,
and each MoE layer's routing over training (gate entropy, dead experts, expert similarity), read
from the runs' ``metrics.csv`` (:data:`~moe_lab.run.record.ACT_COLUMN`,
:data:`~moe_lab.run.record.GATE_COLUMN`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_lab.run.record import ACT_COLUMN, GATE_COLUMN, METRICS_FILE

#: The per-MoE-layer scalars reported over training.
ROUTING_SCALARS = ("entropy", "dead", "similarity")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else math.nan


def run_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """One run's diagnostics from its ``metrics.csv`` (None when it has none)."""
    try:
        metrics = pd.read_csv(Path(run_dir) / METRICS_FILE)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    if metrics.empty:
        return None
    first, last = metrics.iloc[0], metrics.iloc[-1]
    out: dict[str, Any] = {
        "train_acc": float(last.get("train_acc", math.nan)),
        "val_acc": float(last.get("val_acc", math.nan)),
    }
    act = [(c, ACT_COLUMN.match(c)) for c in metrics.columns if ACT_COLUMN.match(c)]
    out["act_init"] = {m["layer"]: float(first[c]) for c, m in act if m["kind"] == "std_init"}
    out["act_end"] = {m["layer"]: float(last[c]) for c, m in act if m["kind"] == "std"}
    for scalar in ROUTING_SCALARS:
        columns = [
            c for c in metrics.columns
            if (m := GATE_COLUMN.match(c)) and m["scalar"] == scalar
        ]  # fmt: skip
        out[f"{scalar}_first"] = _mean([float(first[c]) for c in columns])
        out[f"{scalar}_last"] = _mean([float(last[c]) for c in columns])
    return out


def why_table(data: Any) -> pd.DataFrame:
    """One row per arm (``data``: a :class:`~moe_lab.analysis.comparison.ComparisonData`): the
    mean over its completed final runs of ``train_acc``, ``val_acc`` (last epoch), ``fit_gap``
    (train − val), per-layer ``act_init``/``act_end`` (dicts, layer order), and the mean over its
    MoE layers of each routing scalar at the first and last epoch."""
    runs = data.runs
    done = runs[(runs["stage"] == "final") & (runs["status"] == "completed")]
    rows = []
    for arm in data.arms:
        found = [
            d for d in (run_diagnostics(Path(p)) for p in done[done["arm"] == arm]["run_dir"]) if d
        ]
        row: dict[str, Any] = {"arm": arm, "runs": len(found)}
        for key in (
            "train_acc",
            "val_acc",
            *(f"{s}_{w}" for s in ROUTING_SCALARS for w in ("first", "last")),
        ):
            row[key] = _mean([d[key] for d in found])
        row["fit_gap"] = row["train_acc"] - row["val_acc"]
        for key in ("act_init", "act_end"):
            layers = list(found[0][key]) if found else []
            row[key] = {
                layer: _mean([d[key].get(layer, math.nan) for d in found]) for layer in layers
            }
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["ROUTING_SCALARS", "run_diagnostics", "why_table"]
