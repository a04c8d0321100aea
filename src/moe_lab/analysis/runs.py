"""Reading a sweep: one row per run from ``summary.json``, per-epoch curves from ``metrics.csv``.

A *sweep dir* holds one sub-dir per job (Hydra's ``hydra.sweep.dir``), possibly nested one more
level (``SWEEP/<experiment>/<job>/``). Each job dir follows the run contract in CONTRIBUTING.md:
``summary.json`` (one JSON object) and ``metrics.csv`` (one row per completed epoch).

Every job dir found is reported, never silently dropped. The ``status`` column is one of

- ``completed`` / ``failed`` / ``diverged``: as written by the run in ``summary.json``;
- ``partial``: the job was killed mid-run: no ``summary.json`` but ``metrics.csv`` has rows, or a
  ``summary.json`` still saying ``"status": "running"`` (interrupted before recording an outcome);
- ``missing``: no ``summary.json`` and no epoch in ``metrics.csv``;
- ``invalid``: ``summary.json`` is unreadable or breaks the contract (missing fields, unknown
  status, an accuracy outside [0, 1]); ``detail`` names the file and the problem.

Only ``completed`` runs enter any average (see :mod:`moe_lab.analysis.stats`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

#: Fields every ``summary.json`` must have (SPEC 2.2); a value may be ``null``.
REQUIRED_FIELDS: tuple[str, ...] = (
    "model",
    "data",
    "n_experts",
    "seed",
    "params",
    "status",
    "epochs",
    "val_acc_last",
    "val_acc_best",
    "test_acc",
    "wall_time_s",
)
#: Further contract fields (CONTRIBUTING.md); filled with null when a summary lacks them.
OPTIONAL_FIELDS: tuple[str, ...] = (
    "experiment",
    "top_k",
    "routing",
    "flops_per_example",
    "width_multiplier",
    "match_target",
    "error_type",
    "error_message",
    "diverged_at",
    "max_epochs",
    "run_dir",
    "overrides",
)
#: Statuses a run writes itself.
RUN_STATUSES: tuple[str, ...] = ("completed", "failed", "diverged")
#: Every status that keeps a run out of the averages.
NOT_COMPLETED_STATUSES: tuple[str, ...] = ("failed", "diverged", "partial", "missing", "invalid")
#: Accuracy fields, fractions in [0, 1].
ACCURACY_FIELDS: tuple[str, ...] = ("val_acc_last", "val_acc_best", "test_acc")
#: Columns that identify a group of repetitions (seeds). The optional ones (``top_k``, and
#: ``routing``: the non-default routing options, e.g. "gate_input=pooled") only count when some
#: run has them.
GROUP_KEYS: tuple[str, ...] = ("data", "model", "n_experts", "top_k", "routing")
_OPTIONAL_GROUP_KEYS: tuple[str, ...] = ("top_k", "routing")

_NUMERIC_FIELDS = (
    "n_experts",
    "top_k",
    "seed",
    "params",
    "epochs",
    "max_epochs",
    "flops_per_example",
    "width_multiplier",
    "wall_time_s",
    *ACCURACY_FIELDS,
)
# Files and dirs that mark a directory as a job dir (Hydra writes .hydra/ and <job>.log at job
# start, so a job killed before its first epoch is still found).
_RUN_MARKERS = ("summary.json", "metrics.csv", ".hydra", "checkpoints")
# moe_lab.analysis.jacobian.RECORD_FILE, spelled out: that module needs torch
_JACOBIAN_RECORD = "jacobian.json"
_GATE_COLUMN = re.compile(
    r"^gate/(?P<layer>.+)/(?:(?P<kind>importance|load)_(?P<expert>\d+)|entropy)$"
)

# The leading columns of the runs table, in this order; any extra summary field follows.
_RUN_COLUMNS = (
    "run_name",
    "group",
    "status",
    "detail",
    *REQUIRED_FIELDS[:2],
    "n_experts",
    "top_k",
    "routing",
    "seed",
    "params",
    "flops_per_example",
    "width_multiplier",
    "match_target",
    "experiment",
    "epochs",
    "max_epochs",
    "val_acc_last",
    "val_acc_best",
    "test_acc",
    "wall_time_s",
    "error_type",
    "error_message",
    "diverged_at_epoch",
    "diverged_at_step",
    "overrides",
    "run_dir",
    "run_dir_recorded",
    "summary_path",
)


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``2`` before ``10`` (Hydra numbers jobs 0, 1, ..., 10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _is_run_dir(path: Path) -> bool:
    if any((path / marker).exists() for marker in _RUN_MARKERS):
        return True
    return any(path.glob("*.log"))


def _subdirs(path: Path) -> list[Path]:
    # Hidden dirs (.hydra, .submitit), wandb/ and checkpoints/ are bookkeeping, never jobs.
    return sorted(
        (
            p
            for p in path.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in ("wandb", "checkpoints")
        ),
        key=lambda p: _natural_key(p.name),
    )


def find_run_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job dirs below ``sweep_dir``, at any depth; a job dir's own sub-dirs are not searched.

    A directory is a job dir when it holds ``summary.json``, ``metrics.csv``, ``.hydra/``,
    ``checkpoints/`` or a ``*.log`` file. Jobs usually sit one level down (``SWEEP/<job>``), or
    two (``SWEEP/<group>/<job>``); deeper ones happen when an override value holds a ``/``
    (Hydra's ``override_dirname`` then spells a path). A single run dir passed as ``sweep_dir``
    is returned as itself.
    """
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "summary.json").is_file():
        return [sweep_dir]
    found: list[Path] = []
    pending = _subdirs(sweep_dir)
    while pending:
        child = pending.pop(0)
        if (child / _JACOBIAN_RECORD).is_file():
            continue  # a Jacobian-experiment run: it has .hydra/ and a log, but trained nothing
        if _is_run_dir(child):
            found.append(child)
        else:
            pending[:0] = _subdirs(child)  # depth first, keeps the natural order
    return found


def _check_sweep_dir(sweep_dir: str | Path) -> Path:
    path = Path(sweep_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"sweep dir {str(path)!r} does not exist; pass the multirun's sweep dir"
        )
    if not path.is_dir():
        raise ValueError(
            f"sweep dir {str(path)!r} is a file, not a directory; pass the multirun's sweep dir"
        )
    return path.resolve()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_summary(summary: Any) -> list[str]:
    """Contract problems in one parsed ``summary.json`` (an empty list when it is valid)."""
    if not isinstance(summary, dict):
        return [f"summary.json holds a JSON {type(summary).__name__}, expected an object"]
    missing = [field for field in REQUIRED_FIELDS if field not in summary]
    if missing:
        return [f"summary.json missing fields {missing}"]
    problems: list[str] = []
    if summary["status"] not in RUN_STATUSES:
        problems.append(f"status {summary['status']!r} is not one of {list(RUN_STATUSES)}")
    for field in _NUMERIC_FIELDS:
        value = summary.get(field)
        if value is not None and not _is_number(value):
            problems.append(f"{field}={value!r} is not a number or null")
    for field in ACCURACY_FIELDS:
        value = summary.get(field)
        if _is_number(value) and not (0.0 <= value <= 1.0):
            problems.append(f"{field}={value!r} outside [0, 1] (accuracies are fractions, not %)")
    for field in ("model", "data"):
        if not isinstance(summary[field], str) or not summary[field]:
            problems.append(f"{field}={summary[field]!r} is not a non-empty string")
    return problems


def group_label(model: Any, n_experts: Any = None, top_k: Any = None, routing: Any = None) -> str:
    """Readable name of a group of repetitions, e.g. ``"moe K=2"``, ``"moe K=8 top-2"``, ``"cnn"``,
    ``"moe K=4 top-1 gate_input=pooled"``."""
    parts = [str(model) if _present(model) else "?"]
    if _present(n_experts):
        parts.append(f"K={_fmt_int(n_experts)}")
    if _present(top_k):
        parts.append(f"top-{_fmt_int(top_k)}")
    if _present(routing) and str(routing):
        parts.append(str(routing))
    return " ".join(parts)


def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        return not bool(pd.isna(value))
    except (TypeError, ValueError):
        return True


def _fmt_int(value: Any) -> str:
    if _is_number(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _read_overrides(run_dir: Path) -> list[str] | None:
    """Hydra's ``.hydra/overrides.yaml`` (a YAML list of strings), or None."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        import yaml  # PyYAML ships with Hydra/OmegaConf; imported lazily as it is optional here.

        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:
        return None
    return [str(item) for item in loaded] if isinstance(loaded, list) else None


def _count_metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return 0
    try:
        return len(pd.read_csv(path))
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError):
        return 0


def _row_without_summary(run_dir: Path) -> dict[str, Any]:
    """A ``partial`` / ``missing`` row, with model/data/seed taken from Hydra's overrides."""
    n_epochs = _count_metric_rows(run_dir)
    row: dict[str, Any] = {"epochs": n_epochs}
    overrides = _read_overrides(run_dir)
    if overrides is not None:
        row["overrides"] = overrides
        for item in overrides:
            key, sep, value = item.partition("=")
            if sep and key.lstrip("+~") in ("model", "data", "seed"):
                row[key.lstrip("+~")] = int(value) if value.lstrip("-").isdigit() else value
    known = f"; overrides: {' '.join(overrides)}" if overrides else ""
    if n_epochs > 0:
        row["status"] = "partial"
        row["detail"] = (
            f"no summary.json; metrics.csv has {n_epochs} epoch(s) (job killed mid-run?)"
        ) + known
    else:
        row["status"] = "missing"
        row["detail"] = (
            "no summary.json and no epoch in metrics.csv (job killed before its first epoch?)"
        ) + known
    return row


def _row_from_summary(summary_path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems = [f"summary.json is not valid JSON ({err})"]
        summary = None
    else:
        if isinstance(summary, dict) and summary.get("status") == "running":
            # Written by a run that was interrupted (Ctrl-C, a scheduler's SIGTERM) before it
            # could record an outcome: a partial run, not a broken file.
            row = {k: v for k, v in summary.items() if k != "status"}
            row.pop("diverged_at", None)
            row["status"] = "partial"
            n_epochs = _count_metric_rows(summary_path.parent)
            row["epochs"] = n_epochs
            row["detail"] = (
                f"summary.json says status 'running' (job interrupted); metrics.csv has "
                f"{n_epochs} epoch(s)"
            )
            return row
        problems = validate_summary(summary)
    if problems:
        detail = f"{summary_path}: " + "; ".join(problems)
        warnings.warn(f"invalid run summary, listed as status 'invalid': {detail}", stacklevel=3)
        row = (
            {k: v for k, v in summary.items() if k != "status"} if isinstance(summary, dict) else {}
        )
        row["status"] = "invalid"
        row["detail"] = detail
        return row
    row = dict(summary)
    diverged_at = row.pop("diverged_at", None)
    if isinstance(diverged_at, dict):
        row["diverged_at_epoch"] = diverged_at.get("epoch")
        row["diverged_at_step"] = diverged_at.get("step")
    if row["status"] == "failed":
        row["detail"] = (
            f"{row.get('error_type') or 'error'}: {row.get('error_message') or '(no message)'}"
        )
    elif row["status"] == "diverged":
        where = []
        if _present(row.get("diverged_at_epoch")):
            where.append(f"epoch {_fmt_int(row['diverged_at_epoch'])}")
        if _present(row.get("diverged_at_step")):
            where.append(f"step {_fmt_int(row['diverged_at_step'])}")
        row["detail"] = "diverged" + (" at " + ", ".join(where) if where else "")
        if row.get("error_message"):
            row["detail"] += f" ({row['error_message']})"
    return row


def load_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job dir below ``sweep_dir`` (see :func:`find_run_dirs`).

    Columns: ``run_name`` (the job dir relative to the sweep dir), ``group`` (see
    :func:`group_label`), ``status`` (module docstring), ``detail`` (why a run is not completed),
    every contract field of ``summary.json`` (``diverged_at`` split into ``diverged_at_epoch`` and
    ``diverged_at_step``; ``overrides`` joined with spaces), any extra field a summary holds,
    ``run_dir`` (where the job dir is now), ``run_dir_recorded`` (the ``run_dir`` the run wrote,
    possibly on another machine) and ``summary_path``.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
        ValueError: ``sweep_dir`` is a file, or holds no job dir.

    A ``summary.json`` that breaks the contract gives an ``invalid`` row and a warning naming
    the file and the problem (e.g. ``summary.json missing fields ['test_acc']``).
    """
    sweep = _check_sweep_dir(sweep_dir)
    run_dirs = find_run_dirs(sweep)
    if not run_dirs:
        raise ValueError(
            f"no runs found in sweep dir {str(sweep)!r}: expected one sub-dir per job holding "
            "summary.json (e.g. SWEEP/0/summary.json); is this the multirun's sweep dir?"
        )
    rows = []
    for run_dir in run_dirs:
        summary_path = run_dir / "summary.json"
        row = (
            _row_from_summary(summary_path)
            if summary_path.is_file()
            else _row_without_summary(run_dir)
        )
        row["run_dir_recorded"] = row.pop("run_dir", None)
        row["run_dir"] = str(run_dir)
        row["run_name"] = (
            run_dir.relative_to(sweep).as_posix() if run_dir != sweep else run_dir.name
        )
        row["summary_path"] = str(summary_path) if summary_path.is_file() else None
        overrides = row.get("overrides")
        if isinstance(overrides, list):
            row["overrides"] = " ".join(str(item) for item in overrides)
        for key, value in list(row.items()):
            if isinstance(value, dict | list):  # extra nested fields: keep them as JSON text
                row[key] = json.dumps(value, sort_keys=True)
        rows.append(row)

    runs = pd.DataFrame(rows)
    for column in _RUN_COLUMNS:
        if column not in runs.columns:
            runs[column] = None
    for column in (*_NUMERIC_FIELDS, "diverged_at_epoch", "diverged_at_step"):
        numbers = pd.to_numeric(runs[column], errors="coerce")
        whole = numbers.dropna()
        # Counts and ids stay integers (nullable Int64) so summary.csv shows 1000, not 1000.0.
        if column not in (*ACCURACY_FIELDS, "wall_time_s") and (whole == whole.round()).all():
            numbers = numbers.astype("Int64")
        runs[column] = numbers
    # Runs without a valid summary cannot be placed in a group (n_experts, top_k are unknown).
    runs["group"] = [
        group_label(m, k, t, r) if status in RUN_STATUSES else None
        for m, k, t, r, status in zip(
            runs["model"],
            runs["n_experts"],
            runs["top_k"],
            runs["routing"],
            runs["status"],
            strict=True,
        )
    ]
    extra = [c for c in runs.columns if c not in _RUN_COLUMNS]
    return runs[list(_RUN_COLUMNS) + extra].reset_index(drop=True)


def group_keys(runs: pd.DataFrame) -> list[str]:
    """The group-key columns for ``runs``: data, model, n_experts, plus top_k and routing if any
    run sets them."""
    keys = ["data", "model", "n_experts"]
    for key in _OPTIONAL_GROUP_KEYS:
        if key in runs.columns and runs[key].notna().any():
            keys.append(key)
    return keys


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
        path = Path(run["run_dir"]) / "metrics.csv"
        if not path.is_file():
            warnings.warn(
                f"run {run['run_name']!r} has status {run['status']!r} but no {path}", stacklevel=2
            )
            continue
        try:
            metrics = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            continue
        missing = [c for c in ("epoch", "val_acc") if c not in metrics.columns]
        if missing:
            raise ValueError(
                f"{path}: metrics.csv missing columns {missing} (see CONTRIBUTING.md, run contract)"
            )
        for column in id_columns:
            metrics.insert(id_columns.index(column), column, run[column])
        frames.append(metrics)
    if not frames:
        return pd.DataFrame(columns=[*id_columns, "epoch", "val_acc"])
    return pd.concat(frames, ignore_index=True)


def load_expert_usage(curves: pd.DataFrame) -> pd.DataFrame:
    """The ``gate/<layer>/...`` columns of ``curves`` (from :func:`load_curves`) as a tidy frame.

    One row per (run, epoch, layer, quantity, expert): ``run_name``, ``group``, ``data``,
    ``seed``, ``epoch`` (0-based), ``layer``, ``kind`` (``"importance"``: mean gate value of the
    expert; ``"load"``: share of routed inputs; ``"entropy"``: gate entropy), ``expert`` (index k,
    ``<NA>`` for entropy) and ``value``. Rows whose value is missing (non-MoE runs) are dropped.
    """
    gate_columns = [c for c in curves.columns if isinstance(c, str) and _GATE_COLUMN.match(c)]
    id_columns = [c for c in ("run_name", "group", "data", "seed", "epoch") if c in curves.columns]
    if not gate_columns:
        return pd.DataFrame(columns=[*id_columns, "layer", "kind", "expert", "value"])
    tidy = curves[id_columns + gate_columns].melt(
        id_vars=id_columns, var_name="column", value_name="value"
    )
    tidy = tidy.dropna(subset=["value"])
    parsed = tidy["column"].str.extract(_GATE_COLUMN)
    tidy["layer"] = parsed["layer"]
    tidy["kind"] = parsed["kind"].fillna("entropy")
    tidy["expert"] = pd.to_numeric(parsed["expert"]).astype("Int64")
    tidy["value"] = tidy["value"].astype(float)
    return tidy.drop(columns="column").reset_index(drop=True)
