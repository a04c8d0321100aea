"""A comparison's final runs read for the paired statistics and the replicates' agreement.

- :func:`paired_data`: each final run's per-example correctness (its ``predictions.npz``) as
  :class:`~moe_lab.analysis.paired_data.PairedData`, indexed ``(replicate r, seed index j)``: the
  same cell is the same seed in every arm. Cells that some arm lacks (a run that did not
  complete, or wrote no predictions) are left out of every arm alike, and said.
- :func:`replicate_table`: per arm and replicate, the configuration its tuning chose, its best
  validation accuracy and its final runs' test accuracy; and how far the replicates disagree.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from moe_lab.run.comparison import final_dir
from moe_lab.run.record import read_predictions

from .paired_data import PairedData
from .stats import describe


def _final_seeds_of(settings: dict[str, Any], replicate: int) -> list[int]:
    """Replicate ``r``'s final seeds as the comparison recorded them (``final_seeds`` lists every
    replicate's, ``seeds`` apiece)."""
    seeds = int(settings["seeds"])
    return list(settings["final_seeds"])[replicate * seeds : (replicate + 1) * seeds]


def paired_data(data: Any) -> tuple[PairedData | None, str]:
    """``(PairedData, note)`` of the comparison's completed final runs (``data``: a
    :class:`~moe_lab.analysis.comparison.ComparisonData`); ``(None, why)`` when no cell is
    complete in every arm or the runs scored different test sets."""
    runs = data.runs
    done = runs[(runs["stage"] == "final") & (runs["status"] == "completed")]
    done_dirs = set(done["run_dir"])
    cells: dict[str, dict[tuple[int, int], Any]] = {}
    labels: np.ndarray | None = None
    for arm in data.arms:
        cells[arm] = {}
        for r in range(data.replicates):
            for j, seed in enumerate(_final_seeds_of(data.settings, r)):
                run_dir = data.dir / final_dir(arm, r, seed, data.replicates)
                read = read_predictions(run_dir) if str(run_dir) in done_dirs else None
                if read is None:
                    continue
                pred, label = read
                if labels is None:
                    labels = label
                elif label.shape != labels.shape or (label != labels).any():
                    return None, f"{run_dir} scored another test set than the other final runs"
                cells[arm][(r, j)] = pred == label
    common = sorted(set.intersection(*(set(c) for c in cells.values()))) if cells else []
    expected = data.replicates * int(data.settings["seeds"])
    if not common:
        return None, "no (replicate, seed) has a completed final run with predictions in every arm"
    replicates = sorted({r for r, _ in common})
    per_replicate = [[j for rr, j in common if rr == r] for r in replicates]
    if len({len(js) for js in per_replicate}) != 1:  # keep a rectangle: the fewest seeds apiece
        n = min(len(js) for js in per_replicate)
        common = [
            (r, js[k]) for r, js in zip(replicates, per_replicate, strict=True) for k in range(n)
        ]
    n_seeds = len(common) // len(replicates)
    correct = {
        arm: np.stack([c[cell] for cell in common]).reshape(len(replicates), n_seeds, -1)
        for arm, c in cells.items()
    }
    note = (
        ""
        if len(common) == expected
        else f"paired over the {len(common)} of {expected} (replicate, seed) cells that every arm "
        "completed"
    )
    return PairedData(correct), note


def replicate_table(data: Any) -> pd.DataFrame:
    """One row per arm and replicate: ``best_trial``, ``best_val_acc``, ``best_params`` (JSON)
    and the final runs' ``test_acc_mean``/``test_acc_se``/``final_n``."""
    rows = []
    trials, runs = data.trials, data.runs
    finals = runs[(runs["stage"] == "final") & (runs["status"] == "completed")]
    for arm in data.arms:
        for r in range(data.replicates):
            mine = (
                trials[(trials["arm"] == arm) & (trials["replicate"] == r)]
                if len(trials)
                else trials
            )
            complete = mine[mine["state"] == "COMPLETE"] if len(mine) else mine
            row: dict[str, Any] = {"arm": arm, "replicate": r}
            if len(complete):
                best = complete.sort_values(["value", "trial"], ascending=[False, True]).iloc[0]
                row.update(best_trial=int(best["trial"]), best_val_acc=float(best["value"]),
                           best_params=best["params_json"])  # fmt: skip
            else:
                row.update(best_trial=None, best_val_acc=math.nan, best_params=None)
            replicate = pd.to_numeric(finals["replicate"], errors="coerce")
            here = finals[(finals["arm"] == arm) & (replicate.fillna(0) == r)]
            row["test_acc_mean"], row["test_acc_se"], row["final_n"] = describe(here["test_acc"])
            rows.append(row)
    return pd.DataFrame(rows)


def replicate_spread(table: pd.DataFrame) -> pd.DataFrame:
    """Per arm, how far its replicates disagree: the SD (ddof 1) over replicates of the best
    validation accuracy and of the final test accuracy, and how many distinct configurations
    they chose."""
    rows = []
    for arm, mine in table.groupby("arm", sort=False):
        rows.append(
            {
                "arm": arm,
                "replicates": len(mine),
                "best_val_acc_sd": float(mine["best_val_acc"].std(ddof=1)) if len(mine) > 1 else math.nan,
                "test_acc_sd": float(mine["test_acc_mean"].std(ddof=1)) if len(mine) > 1 else math.nan,
                "distinct_configs": int(mine["best_params"].dropna().map(json.loads).map(
                    lambda p: json.dumps(p, sort_keys=True)).nunique()),
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


__all__ = ["paired_data", "replicate_spread", "replicate_table"]
