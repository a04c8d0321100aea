"""A comparison dir read back, and its per-arm statistics: what the comparison report renders.

Reads the comparison's record (``comparison.json``, :class:`moe_lab.run.comparison.ComparisonRecord`),
its Optuna studies (``study.db``, one per arm) and its run dirs (``tune/<arm>/trial_<i>/``,
``final/<arm>/seed_<s>/``, each with ``summary.json`` and ``metrics.csv``), into a
:class:`ComparisonData`; :func:`summarize_comparison` gives a row per arm: the budget and the
compute it used, the best trial, the expected validation performance, the final test accuracy
mean ± SE over the fresh seeds (:func:`moe_lab.analysis.stats.describe`) and Welch's t-test
against the baseline arm (:func:`moe_lab.analysis.stats.welch_test`), the same statistics step
as the sweep report's.

A trial that failed or diverged scores :data:`FAILED_TRIAL_SCORE` in the expected-validation-
performance curve (a draw that yields no usable model); it never enters the final statistics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moe_lab.run.comparison import (
    STUDY_DB,
    ComparisonRecord,
    has_study_db,
    parse_study_name,
    read_record,
    read_sessions,
    study_name,
    study_storage,
)
from moe_lab.run.labels import group_label

from .curves import load_curves
from .evp import expected_max_curve
from .finals import paired_data, replicate_table
from .paired import compare_to_baseline
from .runs import RUN_COLUMNS, load_runs
from .stats import DEFAULT_BASELINES, TEST_COLUMNS, describe, welch_test
from .why import why_table

#: The score a failed or diverged trial enters the expected-validation-performance curve with.
FAILED_TRIAL_SCORE = 0.0


@dataclass
class ComparisonData:
    """Everything the comparison report reads from a comparison dir."""

    dir: Path
    record: ComparisonRecord
    #: a row per Optuna trial (``arm, trial, state, status, value, seed, run_dir, ...``,
    #: ``params_json`` and a ``param:<key>`` column per hyperparameter)
    trials: pd.DataFrame
    #: :func:`~moe_lab.analysis.runs.load_runs` of the dir, with ``stage`` and ``arm``
    runs: pd.DataFrame
    arms: list[str]
    sessions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def settings(self) -> dict[str, Any]:
        return self.record.settings

    @property
    def replicates(self) -> int:
        """Independent tuning studies per arm (1 for comparisons from before replicates)."""
        return int(self.settings.get("replicates", 1))


#: The pseudo-state of a trial whose proposal a kill cut off (it never ran; not in the budget).
ABANDONED = "ABANDONED"


def _open_storage(comparison_dir: Path) -> Any:
    """The dir's study storage, or ValueError in one line when it cannot be read."""
    import optuna  # imported here: the sweep report does not need it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = comparison_dir / STUDY_DB
    if not has_study_db(comparison_dir):
        raise ValueError(f"{db} is missing: not a comparison dir")
    if db.stat().st_size == 0:
        raise ValueError(f"{db} is empty (0 bytes): its trials are lost; restore it from a backup")
    storage = study_storage(comparison_dir)
    try:
        known = {s.study_name for s in optuna.get_all_study_summaries(storage=storage)}
    except Exception as err:  # sqlalchemy's DatabaseError and the like
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{db} is not a readable Optuna study ({first})") from None
    return storage, known


def _read_trials(comparison_dir: Path, arms: list[str]) -> pd.DataFrame:
    import optuna

    storage, known = _open_storage(comparison_dir)
    rows = []
    studies = [(parse_study_name(name), name) for name in known]
    studies = [(key, name) for key, name in studies if key[0] in arms]
    for (arm, replicate), name in sorted(studies, key=lambda s: (arms.index(s[0][0]), s[0][1])):
        study = optuna.load_study(study_name=name, storage=storage)
        for trial in study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            # the runner's one-write proposal (older comparisons: its fields one by one)
            proposal = attrs.get("proposal") or attrs
            rows.append(
                {
                    "arm": arm,
                    "replicate": replicate,
                    "trial": trial.number,
                    "state": ABANDONED if attrs.get("abandoned") else trial.state.name,
                    "status": attrs.get("status"),
                    "value": trial.value,
                    "seed": proposal.get("seed"),
                    "run_dir": proposal.get("run_dir"),
                    "guided": proposal.get("guided"),
                    "wall_time_s": attrs.get("wall_time_s"),
                    "epochs": attrs.get("epochs"),
                    "error": attrs.get("error"),
                    "params_json": json.dumps(trial.params, sort_keys=True),
                    **{f"param:{k}": v for k, v in trial.params.items()},
                }
            )
    columns = ["arm", "replicate", "trial", "state", "status", "value", "seed", "run_dir",
               "guided", "wall_time_s"]  # fmt: skip
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*columns, "params_json"])


def load_comparison(comparison_dir: str | Path) -> ComparisonData:
    """Read a comparison dir (raises ValueError when it is none, naming what is missing)."""
    path = Path(comparison_dir).expanduser().resolve()
    record = read_record(path)
    arms = list(record.settings["arms"])
    trials = _read_trials(path, arms)
    try:
        runs = load_runs(path)
    except ValueError:  # no run dir yet (e.g. stopped before any run wrote a file)
        runs = pd.DataFrame(columns=list(RUN_COLUMNS))
    for column in ("stage", "arm"):
        if column not in runs.columns:
            runs[column] = None
    return ComparisonData(path, record, trials, runs, arms, read_sessions(path))


def pick_baseline(record: ComparisonRecord, arms: list[str], baseline: str | None) -> str:
    """The baseline arm: ``baseline``, else the recorded one, else the first default present."""
    wanted = baseline if baseline is not None else record.baseline
    if wanted is not None:
        if wanted not in arms:
            raise ValueError(f"baseline {wanted!r} is not one of the arms {arms}")
        return str(wanted)
    return next((b for b in DEFAULT_BASELINES if b in arms), arms[0])


def arm_label(arm: str, runs: pd.DataFrame) -> str:
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
    if not len(trials):
        return np.array([], dtype=float)
    mine = trials[(trials["arm"] == arm) & trials["state"].isin(["COMPLETE", "FAIL"])]
    mine = mine.sort_values(["replicate", "trial"])
    return np.array(
        [
            float(v) if s == "COMPLETE" else FAILED_TRIAL_SCORE
            for s, v in zip(mine["state"], mine["value"], strict=True)
        ],
        dtype=float,
    )


def _summed(runs: pd.DataFrame, column: str) -> float:
    return float(pd.to_numeric(runs[column]).fillna(0).sum()) if len(runs) else 0.0


def _tuning_row(
    data: ComparisonData, arm: str, scores: np.ndarray, problems: list[str]
) -> dict[str, Any]:
    """The arm's tuning: its trials (over every replicate), their compute, how many the sampler
    drew at random and how many it chose from results, its best trial and its EVP."""
    budget = int(data.settings["trials"]) * data.replicates
    trials = data.trials
    mine = trials[trials["arm"] == arm] if len(trials) else trials
    complete = mine[mine["state"] == "COMPLETE"]
    n_failed = int((mine["state"] == "FAIL").sum())
    row: dict[str, Any] = {
        "budget_trials": budget,
        "max_epochs": data.settings.get("max_epochs"),
        "trials_completed": len(complete),
        "trials_failed": n_failed,
        "trials_running": int((mine["state"] == "RUNNING").sum()),
        "replicates": data.replicates,
    }
    counted = mine[mine["state"] != ABANDONED]
    guided = counted["guided"] if "guided" in counted.columns else pd.Series(dtype=object)
    row["trials_guided"] = int((guided == True).sum())  # noqa: E712  (NaN: not recorded)
    row["trials_random"] = int((guided == False).sum())  # noqa: E712
    if len(complete) + n_failed < budget:
        problems.append(
            f"arm {arm}: {len(complete) + n_failed} of {budget} trials finished "
            "(resume the comparison to finish them)"
        )
    tune_runs = data.runs[(data.runs["stage"] == "tune") & (data.runs["arm"] == arm)]
    row["tune_wall_time_s"] = _summed(tune_runs, "wall_time_s")
    row["tune_epochs"] = int(_summed(tune_runs, "epochs"))
    if len(complete):
        # the first replicate's best (the only one without replicates); the replicates table
        # gives every replicate's
        first = complete[complete["replicate"] == complete["replicate"].min()]
        best = first.sort_values(["value", "trial"], ascending=[False, True]).iloc[0]
        row["best_trial"], row["best_val_acc"] = int(best["trial"]), float(best["value"])
        row["best_params"] = best["params_json"]
    else:
        row["best_trial"], row["best_val_acc"], row["best_params"] = None, math.nan, None
        problems.append(f"arm {arm}: no trial completed, so there is no best configuration")
    row["evp_n1"] = row["evp_nN"] = row["evp_nN_std"] = math.nan
    if scores.size:
        curve = expected_max_curve(scores)
        row["evp_n1"] = float(curve["mean"].iloc[0])
        row["evp_nN"] = float(curve["mean"].iloc[-1])
        row["evp_nN_std"] = float(curve["std"].iloc[-1])
    return row


def _final_row(data: ComparisonData, arm: str, has_best: bool, problems: list[str]) -> dict:
    """The arm's final runs: how many completed, and their test accuracy mean ± SE."""
    final_runs = data.runs[(data.runs["stage"] == "final") & (data.runs["arm"] == arm)]
    done = final_runs[final_runs["status"] == "completed"]
    expected_seeds = list(data.settings["final_seeds"]) if has_best else []
    row: dict[str, Any] = {"final_n": len(done)}
    row["final_not_completed"] = (len(final_runs) - len(done)) + max(
        0, len(expected_seeds) - len(final_runs)
    )
    if row["final_not_completed"]:
        problems.append(f"arm {arm}: {len(done)} of {len(expected_seeds)} final runs completed")
    row["final_seeds"] = " ".join(str(int(s)) for s in sorted(done["seed"].dropna()))
    row["test_acc_mean"], row["test_acc_se"], _ = describe(done["test_acc"])
    mean, se, _ = describe(done["val_acc_best"])
    row["final_val_acc_best_mean"], row["final_val_acc_best_se"] = mean, se
    row["final_wall_time_s"] = _summed(final_runs, "wall_time_s")
    for column in ("params", "flops_per_example"):
        values = pd.to_numeric(done[column], errors="coerce").dropna().unique()
        row[column] = int(values[0]) if len(values) == 1 else math.nan
    return row


def final_test_accs(data: ComparisonData, arm: str) -> pd.Series:
    """The test accuracies of the arm's completed final runs."""
    finals = data.runs
    done = finals[
        (finals["stage"] == "final") & (finals["arm"] == arm) & (finals["status"] == "completed")
    ]
    return pd.to_numeric(done["test_acc"], errors="coerce").dropna()


@dataclass
class ComparisonInfo:
    """A comparison's statistics, computed once, that every rendering reads (the markdown, the
    figures, the csv files, the notebook): the per-arm summary, each arm's best hyperparameters
    and finished trials' scores, what keeps it from being complete, and the final runs' curves."""

    data: ComparisonData
    #: a row per arm (module docstring)
    summary: pd.DataFrame
    best_params: dict[str, dict[str, Any]]
    problems: list[str]
    #: ``{arm: label}``, e.g. ``{"moe": "moe K=2"}``
    labels: dict[str, str]
    #: ``{arm: its finished trials' scores in trial order}`` (:func:`trial_scores`)
    scores: dict[str, np.ndarray]
    #: the final runs' per-epoch metrics, ``group`` = the arm's label
    final_curves: pd.DataFrame
    #: per arm and replicate: the chosen configuration and its results (:func:`replicate_table`)
    replicates: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: why the paired statistics cover fewer cells than planned, or are missing ("" when whole)
    paired_note: str = ""
    #: per arm: the final runs' fit, activation scales and routing (:func:`why_table`)
    why: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: ``{matched baseline: a row per other arm}``: every arm against each matched CNN (both
    #: axes of "equal budget"), with the summary's columns and the paired statistics against it
    against: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return str(self.summary["baseline"].iloc[0])

    def evp(self, arm: str, n_max: int | None = None) -> pd.DataFrame:
        """The arm's expected best validation accuracy after n = 1..``n_max`` trials (default:
        as many as it finished)."""
        return expected_max_curve(self.scores[arm], n_max=n_max)


def _final_curves(data: ComparisonData, labels: dict[str, str]) -> pd.DataFrame:
    finals = data.runs[data.runs["stage"] == "final"]
    if not len(finals):
        return pd.DataFrame(columns=["data", "group", "epoch", "val_acc"])
    curves = load_curves(finals)
    if len(curves):
        curves = curves.merge(finals[["run_dir", "arm"]], on="run_dir", how="left")
        curves["group"] = curves["arm"].map(labels)
    return curves


def comparison_info(data: ComparisonData, baseline: str | None = None) -> ComparisonInfo:
    """Every statistic of the comparison in one pass over its trials and runs.

    Raises:
        ValueError: ``baseline`` is not one of the arms.
    """
    base = pick_baseline(data.record, data.arms, baseline)
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    best_params: dict[str, dict[str, Any]] = {}
    scores = {arm: trial_scores(data.trials, arm) for arm in data.arms}
    for arm in data.arms:
        row: dict[str, Any] = {"arm": arm, "label": arm_label(arm, data.runs)}
        row["is_baseline"] = arm == base
        row.update(_tuning_row(data, arm, scores[arm], problems))
        if row["best_params"] is not None:
            best_params[arm] = json.loads(row["best_params"])
        row.update(_final_row(data, arm, row["best_params"] is not None, problems))
        rows.append(row)
    summary = pd.DataFrame(rows)
    base_acc = final_test_accs(data, base)
    for column in TEST_COLUMNS:
        summary[column] = math.nan
    summary["baseline"] = base
    summary["note"] = ""
    for index, row in summary.iterrows():
        if row["arm"] == base:
            summary.loc[index, "note"] = "baseline"
            continue
        for column, value in welch_test(final_test_accs(data, row["arm"]), base_acc).items():
            summary.loc[index, column] = value
    paired, paired_note = paired_data(data)
    if paired is not None and len(data.arms) > 1:
        rows = compare_to_baseline(paired, base).set_index("arm")
        columns = [c for c in rows.columns if c not in ("baseline", "note", "hedges_g")]
        summary = summary.merge(
            rows[columns].rename(columns={"note": "paired_note"}),
            left_on="arm", right_index=True, how="left",
        )  # fmt: skip
        summary["effect_note"] = summary["arm"].map(rows["note"]).fillna("")
    labels = dict(zip(summary["arm"], summary["label"], strict=True))
    replicates = replicate_table(data)
    for chosen in replicates[replicates["replicate"] > 0].itertuples():  # each replicate's best
        if isinstance(chosen.best_params, str):
            best_params[study_name(chosen.arm, chosen.replicate)] = json.loads(chosen.best_params)
    against = {
        matched: _against(summary, paired, matched)
        for matched in MATCHED_BASELINES
        if matched in data.arms and paired is not None
    }
    why = why_table(data)
    scalars = [c for c in why.columns if c not in ("arm", "runs", "act_init", "act_end")]
    summary = summary.merge(
        why[["arm", *scalars]].rename(columns={c: f"why_{c}" for c in scalars}),
        on="arm",
        how="left",
    )
    return ComparisonInfo(
        data, summary, best_params, problems, labels, scores, _final_curves(data, labels),
        replicates, paired_note, why, against,
    )  # fmt: skip


#: The arms that match the MoE twin on one axis: every other arm is also compared with each.
MATCHED_BASELINES = ("cnn_flop_matched", "cnn_matched")


def _against(summary: pd.DataFrame, paired: Any, matched: str) -> pd.DataFrame:
    """Every arm but ``matched`` against it: the summary's columns with the paired statistics
    (Holm across these arms) and Welch's test over the final seeds, against ``matched``."""
    rows = compare_to_baseline(paired, matched).set_index("arm")
    columns = [c for c in rows.columns if c not in ("baseline", "hedges_g", "note")]
    others = summary[summary["arm"] != matched].drop(
        columns=[c for c in (*columns, *TEST_COLUMNS, "note") if c in summary.columns]
    )
    others = others.merge(rows[columns], left_on="arm", right_index=True, how="left")
    others["note"] = others["arm"].map(rows["note"]).fillna("")
    others["diff"] = others["paired_diff"]
    others["baseline"] = matched
    return others


def summarize_comparison(
    data: ComparisonData, baseline: str | None = None
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]], list[str]]:
    """(summary: a row per arm, best_params: ``{arm: {key: value}}``, problems) of
    :func:`comparison_info`."""
    info = comparison_info(data, baseline)
    return info.summary, info.best_params, info.problems


__all__ = [
    "ABANDONED",
    "FAILED_TRIAL_SCORE",
    "ComparisonData",
    "ComparisonInfo",
    "arm_label",
    "comparison_info",
    "final_test_accs",
    "load_comparison",
    "pick_baseline",
    "summarize_comparison",
    "trial_scores",
]
