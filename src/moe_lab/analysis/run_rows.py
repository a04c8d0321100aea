"""One row of the runs table, read from one run dir: its ``summary.json`` when it has a valid
one, what Hydra's overrides and ``metrics.csv`` say when it has none (``partial``/``missing``), and
an ``invalid`` row, with a warning naming the file and the problem, when a file cannot be read or
breaks the run record (:mod:`moe_lab.run.record`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from moe_lab.run.labels import is_present, whole_number_text
from moe_lab.run.record import METRICS_FILE, SUMMARY_FILE, hydra_overrides_path, validate_summary

#: metrics.csv columns a completed run must have for its curve
CURVE_COLUMNS = ("epoch", "val_acc")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_overrides(run_dir: Path) -> list[str] | None:
    """Hydra's ``.hydra/overrides.yaml`` (a YAML list of strings), or None."""
    path = hydra_overrides_path(run_dir)
    try:
        import yaml  # PyYAML ships with Hydra/OmegaConf; imported lazily as it is optional here.

        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # absent, unreadable or not YAML: the job is still reported without it
        return None
    return [str(item) for item in loaded] if isinstance(loaded, list) else None


def _count_metric_rows(run_dir: Path) -> int:
    path = run_dir / METRICS_FILE
    try:
        return len(pd.read_csv(path))
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError):
        return 0


def fields_from_overrides(row: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if sep and key in ("model", "data", "seed"):
            row[key] = int(value) if value.lstrip("-").isdigit() else value


def _row_without_summary(run_dir: Path) -> dict[str, Any]:
    """A ``partial`` / ``missing`` row, with model/data/seed taken from Hydra's overrides."""
    n_epochs = _count_metric_rows(run_dir)
    row: dict[str, Any] = {"epochs": n_epochs}
    overrides = _read_overrides(run_dir)
    if overrides is not None:
        row["overrides"] = overrides
        fields_from_overrides(row, overrides)
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


def _invalid(detail: str, summary: Any = None) -> dict[str, Any]:
    warnings.warn(f"invalid run, listed as status 'invalid': {detail}", stacklevel=4)
    row = {k: v for k, v in summary.items() if k != "status"} if isinstance(summary, dict) else {}
    row["status"] = "invalid"
    row["detail"] = detail
    return row


def _row_from_summary(summary_path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except OSError as err:
        return _invalid(f"{summary_path}: cannot read summary.json ({err.strerror or err})")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return _invalid(f"{summary_path}: summary.json is not valid JSON ({err})")
    except RecursionError:
        return _invalid(f"{summary_path}: summary.json is nested too deeply to parse")
    if isinstance(summary, dict) and summary.get("status") == "running":
        # Written by a run that was killed before it could record an outcome: a partial run, not
        # a broken file.
        row = {k: v for k, v in summary.items() if k != "status"}
        row.pop("diverged_at", None)
        row["status"] = "partial"
        n_epochs = _count_metric_rows(summary_path.parent)
        row["epochs"] = n_epochs
        row["detail"] = (
            f"summary.json says status 'running' (job killed); metrics.csv has {n_epochs} epoch(s)"
        )
        return row
    problems = validate_summary(summary)
    if problems:
        return _invalid(f"{summary_path}: " + "; ".join(problems), summary)
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
        if is_present(row.get("diverged_at_epoch")):
            where.append(f"epoch {whole_number_text(row['diverged_at_epoch'])}")
        if is_present(row.get("diverged_at_step")):
            where.append(f"step {whole_number_text(row['diverged_at_step'])}")
        row["detail"] = "diverged" + (" at " + ", ".join(where) if where else "")
        if row.get("error_message"):
            row["detail"] += f" ({row['error_message']})"
    elif row["status"] == "interrupted":
        row["detail"] = (
            f"interrupted after {whole_number_text(row.get('epochs'))} epoch(s)"
            + (f" ({row['error_message']})" if row.get("error_message") else "")
            + f"; resume with resume={summary_path.parent}"
        )
    return row


def _metrics_problem(run_dir: Path) -> str | None:
    """Why a completed run's ``metrics.csv`` cannot give its curve (None: it can, or it is
    absent, which :func:`load_curves` warns about)."""
    path = run_dir / METRICS_FILE
    try:
        metrics = pd.read_csv(path)
    except FileNotFoundError:
        return None
    except pd.errors.EmptyDataError:
        return f"{path}: metrics.csv is empty"
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        return (
            f"{path}: metrics.csv is corrupt ({type(err).__name__}: {' '.join(str(err).split())})"
        )
    except OSError as err:
        return f"{path}: cannot read metrics.csv ({err.strerror or err})"
    missing = [c for c in CURVE_COLUMNS if c not in metrics.columns]
    if missing:
        return f"{path}: metrics.csv missing columns {missing} (the columns are MetricsRow's, moe_lab/run/record.py)"
    for column in CURVE_COLUMNS:
        if pd.to_numeric(metrics[column], errors="coerce").isna().any():
            return f"{path}: metrics.csv column {column!r} holds a value that is not a number"
    return None


def read_job(run_dir: Path, unreadable: OSError | None) -> dict[str, Any]:
    """One row of the runs table for ``run_dir``; a read error gives an ``invalid`` row."""
    if unreadable is not None:
        return _invalid(f"{run_dir}: cannot read the job dir ({unreadable.strerror or unreadable})")
    summary_path = run_dir / SUMMARY_FILE
    try:
        has_summary = summary_path.exists()
        row = _row_from_summary(summary_path) if has_summary else _row_without_summary(run_dir)
        if row["status"] == "completed":
            problem = _metrics_problem(run_dir)
            if problem:
                row = _invalid(problem, row)
        if not row.get("overrides"):
            overrides = _read_overrides(run_dir)
            if overrides:
                row["overrides"] = overrides
        row["_mtime"] = _newest_mtime(run_dir, (SUMMARY_FILE, METRICS_FILE))
    except OSError as err:
        where = err.filename or run_dir
        return _invalid(f"{where}: cannot read ({err.strerror or err})")
    row["summary_path"] = str(summary_path) if has_summary else None
    return row


def _newest_mtime(run_dir: Path, names: tuple[str, ...]) -> float:
    for name in names:
        try:
            return (run_dir / name).stat().st_mtime
        except OSError:
            continue
    try:
        return run_dir.stat().st_mtime
    except OSError:
        return 0.0


__all__ = ["CURVE_COLUMNS", "fields_from_overrides", "read_job"]
