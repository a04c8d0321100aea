"""Reading a sweep: one row per job from ``summary.json``, per-epoch curves from ``metrics.csv``.

A *sweep dir* holds one sub-dir per job (Hydra's ``hydra.sweep.dir``), possibly nested one more
level (``SWEEP/<experiment>/<job>/``), and Hydra's ``multirun.yaml``. A parent of several sweep
dirs (a sweep and its rerun) is read the same way. Each job dir holds the run record defined in
:mod:`moe_lab.run.record`: ``summary.json`` (:class:`~moe_lab.run.record.RunSummary`) and ``metrics.csv``
(:class:`~moe_lab.run.record.MetricsRow`).

Every job is reported, never silently dropped. The ``status`` column is one of

- ``completed`` / ``failed`` / ``diverged`` / ``interrupted``: as the run wrote it in
  ``summary.json`` (``interrupted``: stopped by SIGTERM / SIGINT, resumable with ``resume=``);
- ``partial``: the job was killed mid-run: no ``summary.json`` but ``metrics.csv`` has rows, or a
  ``summary.json`` still saying ``"status": "running"``;
- ``missing``: a job dir with no ``summary.json`` and no epoch in ``metrics.csv``, or a job that
  the sweep's ``multirun.yaml`` planned and that never started (no dir at all);
- ``invalid``: a file of the job cannot be read or breaks the run record (unreadable dir, corrupt
  ``metrics.csv``, ``summary.json`` not JSON, nested too deeply, missing fields, unknown status,
  an accuracy outside [0, 1]); ``detail`` names the file and the problem;
- ``superseded``: another run of the same config and seed (a rerun) is newer and counts instead.

Groups: a group is data x model x K (x top-k, x routing) together with every override that varies
across the sweep's runs except the seed (and overrides that only say where files go); see
:func:`load_runs`. Only ``completed`` runs enter any average (see :mod:`moe_lab.analysis.stats`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from moe_lab.run.jacobian_record import RECORD_FILE as JACOBIAN_RECORD_FILE
from moe_lab.run.record import (
    ACCURACY_FIELDS,
    FINAL_STATUSES,
    GATE_COLUMN,
    METRICS_FILE,
    NUMERIC_FIELDS,
    SUMMARY_FIELDS,
    SUMMARY_FILE,
    validate_summary,
)
from moe_lab.run.sweep import SweepPlan, override_identity, parse_overrides, read_plan

#: Statuses that keep a job out of the averages and make the report exit non-zero.
NOT_COMPLETED_STATUSES: tuple[str, ...] = (
    "failed",
    "diverged",
    "interrupted",
    "partial",
    "missing",
    "invalid",
)
#: A run that another, newer run of the same config and seed replaces: listed, never counted.
SUPERSEDED = "superseded"
#: Every status of the runs table.
STATUSES: tuple[str, ...] = ("completed", *NOT_COMPLETED_STATUSES, SUPERSEDED)
#: Columns that identify a group of repetitions (seeds), before the swept overrides
#: (``context``). The optional ones (``top_k``, and ``routing``: the non-default routing options,
#: e.g. "gate_input=pooled") only count when some run has them.
GROUP_KEYS: tuple[str, ...] = ("data", "model", "n_experts", "top_k", "routing")
_OPTIONAL_GROUP_KEYS: tuple[str, ...] = ("top_k", "routing")
#: Override keys that never split groups: the seed (what a group repeats over) and the keys that
#: are fields of the group already.
_NOT_CONTEXT = frozenset({"seed", "model", "data"})
_UNSET = "(default)"

# Files and dirs that mark a directory as a job dir (Hydra writes .hydra/ and <job>.log at job
# start, so a job killed before its first epoch is still found).
_RUN_MARKERS = frozenset((SUMMARY_FILE, METRICS_FILE, ".hydra", "checkpoints"))
_NOT_JOBS = frozenset(("wandb", "checkpoints"))
# a Jacobian-experiment run dir (it has .hydra/ and a log, but trained nothing)
_JACOBIAN_RECORD = JACOBIAN_RECORD_FILE
# metrics.csv columns a completed run must have for its curve
_CURVE_COLUMNS = ("epoch", "val_acc")


def _run_columns() -> tuple[str, ...]:
    """The leading columns of the runs table, in this order; any extra summary field follows."""
    fields: list[str] = []
    for name in SUMMARY_FIELDS:
        if name == "status":
            continue
        if name == "diverged_at":
            fields += ["diverged_at_epoch", "diverged_at_step"]
        else:
            fields.append(name)
    return ("run_name", "group", "status", "detail", *fields, "context", "base_group", "started",
            "superseded_by", "run_dir_recorded", "summary_path")  # fmt: skip


_RUN_COLUMNS = _run_columns()


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``2`` before ``10`` (Hydra numbers jobs 0, 1, ..., 10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _list_dir(path: Path) -> list[os.DirEntry[str]]:
    """The entries of ``path``; raises OSError (e.g. PermissionError) when it cannot be read."""
    with os.scandir(path) as entries:
        return list(entries)


def _entry_is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _scan(root: Path) -> tuple[list[Path], dict[Path, OSError], list[Path]]:
    """Job dirs below ``root`` (depth first, natural order), the dirs that could not be read, and
    the sweep dirs (those holding ``multirun.yaml``)."""
    found: list[Path] = []
    unreadable: dict[Path, OSError] = {}
    sweeps: list[Path] = []
    pending = [root]
    while pending:
        path = pending.pop(0)
        try:
            entries = _list_dir(path)
        except OSError as err:
            if path == root:
                raise
            found.append(path)  # listed as invalid: a job we cannot look into is not dropped
            unreadable[path] = err
            continue
        names = {entry.name for entry in entries}
        if path != root and _JACOBIAN_RECORD in names:
            continue  # a Jacobian-experiment run: it has .hydra/ and a log, but trained nothing
        if path != root and (names & _RUN_MARKERS or any(n.endswith(".log") for n in names)):
            found.append(path)  # a job dir's own sub-dirs are not searched
            continue
        if "multirun.yaml" in names:
            sweeps.append(path)
        # Hidden dirs (.hydra, .submitit), wandb/ and checkpoints/ are bookkeeping, never jobs.
        children = sorted(
            (
                Path(entry.path)
                for entry in entries
                if not entry.name.startswith(".")
                and entry.name not in _NOT_JOBS
                and _entry_is_dir(entry)
            ),
            key=lambda p: _natural_key(p.name),
        )
        pending[:0] = children
    return found, unreadable, sweeps


def find_run_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job dirs below ``sweep_dir``, at any depth; a job dir's own sub-dirs are not searched.

    A directory is a job dir when it holds ``summary.json``, ``metrics.csv``, ``.hydra/``,
    ``checkpoints/`` or a ``*.log`` file; a sub-dir that cannot be read is returned too (the
    report lists it as invalid). Jobs usually sit one level down (``SWEEP/<job>``), or two
    (``SWEEP/<group>/<job>``); deeper ones happen when an override value holds a ``/`` (Hydra's
    ``override_dirname`` then spells a path). A single run dir passed as ``sweep_dir`` is returned
    as itself.
    """
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / SUMMARY_FILE).is_file():
        return [sweep_dir]
    return _scan(sweep_dir)[0]


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


def group_label(
    model: Any,
    n_experts: Any = None,
    top_k: Any = None,
    routing: Any = None,
    swept: Iterable[tuple[str, str]] = (),
) -> str:
    """Readable name of a group of repetitions, e.g. ``"moe K=2"``, ``"moe K=8 top-2"``, ``"cnn"``,
    ``"moe K=4 top-1 gate_input=pooled"``, ``"moe K=2 optimizer.lr=0.003"`` (``swept``: the
    ``(key, value)`` overrides that tell this group from others of the same model and K)."""
    parts = [str(model) if _present(model) else "?"]
    if _present(n_experts):
        parts.append(f"K={_fmt_int(n_experts)}")
    if _present(top_k):
        parts.append(f"top-{_fmt_int(top_k)}")
    if _present(routing) and str(routing):
        parts.append(str(routing))
    parts += [f"{key}={value}" for key, value in swept]
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


def _fields_from_overrides(row: dict[str, Any], overrides: list[str]) -> None:
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
        _fields_from_overrides(row, overrides)
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
        if _present(row.get("diverged_at_epoch")):
            where.append(f"epoch {_fmt_int(row['diverged_at_epoch'])}")
        if _present(row.get("diverged_at_step")):
            where.append(f"step {_fmt_int(row['diverged_at_step'])}")
        row["detail"] = "diverged" + (" at " + ", ".join(where) if where else "")
        if row.get("error_message"):
            row["detail"] += f" ({row['error_message']})"
    elif row["status"] == "interrupted":
        row["detail"] = (
            f"interrupted after {_fmt_int(row.get('epochs'))} epoch(s)"
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
    missing = [c for c in _CURVE_COLUMNS if c not in metrics.columns]
    if missing:
        return f"{path}: metrics.csv missing columns {missing} (the columns are MetricsRow's, moe_lab/run/record.py)"
    for column in _CURVE_COLUMNS:
        if pd.to_numeric(metrics[column], errors="coerce").isna().any():
            return f"{path}: metrics.csv column {column!r} holds a value that is not a number"
    return None


def _read_job(run_dir: Path, unreadable: OSError | None) -> dict[str, Any]:
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


def _planned_row(plan: SweepPlan, job: Any, root: Path) -> dict[str, Any]:
    where = job.run_dir if job.run_dir is not None else plan.sweep_dir / f"job {job.num}"
    row: dict[str, Any] = {
        "status": "missing",
        "started": False,
        "epochs": 0,
        "overrides": list(job.overrides),
        "detail": (
            f"never started: job {job.num} of {plan.multirun_yaml}; overrides: "
            f"{' '.join(job.overrides)}"
        ),
        "_dir": where,
        "_mtime": 0.0,
        "summary_path": None,
    }
    _fields_from_overrides(row, list(job.overrides))
    return row


def _fields(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(key) for key in (*GROUP_KEYS, "seed"))


def _mark_superseded(rows: list[dict[str, Any]]) -> None:
    """Of several runs of one (config, seed) the newest completed one counts (the newest of any
    status if none completed); the others become ``superseded``."""
    buckets: dict[Any, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        identity = override_identity(
            row.get("overrides") if isinstance(row.get("overrides"), list) else None
        )
        valid = row["status"] in FINAL_STATUSES
        if identity is not None:
            buckets[("overrides", identity)].append(index)
        elif valid:  # no overrides recorded: the run record's own fields identify it
            buckets[("fields", _fields(row))].append(index)
    for indices in buckets.values():
        if len(indices) < 2:
            continue
        recorded = {_fields(rows[i]) for i in indices if rows[i]["status"] in FINAL_STATUSES}
        if len(recorded) > 1:  # same overrides, different runs (the config changed): keep all
            continue
        completed = [i for i in indices if rows[i]["status"] == "completed"]
        pool = completed or indices
        winner = max(pool, key=lambda i: (rows[i]["_mtime"], _natural_key(rows[i]["run_name"])))
        for i in indices:
            if i == winner:
                continue
            was = rows[i]["status"]
            rows[i]["_was"] = was
            rows[i]["status"] = SUPERSEDED
            rows[i]["superseded_by"] = rows[winner]["run_name"]
            rows[i]["detail"] = (
                f"was {was}; the same config and seed ran again in {rows[winner]['run_name']} "
                f"({rows[winner]['status']}{', newer' if rows[winner]['_mtime'] >= rows[i]['_mtime'] else ''}), "
                "which counts instead"
            )


def _assign_groups(rows: list[dict[str, Any]]) -> None:
    """``context`` (the swept overrides that split groups), ``base_group`` and ``group``.

    An override key splits groups when two runs of the same data x model x K (x top-k x routing)
    disagree on it (an absent key counts as its own value). Keys that follow from those fields
    (e.g. ``experts=k2`` of a MoE with K=2) do not; the seed never does.
    """
    # runs with a valid record (superseded ones too, for their label): partial, missing and
    # invalid rows have no trustworthy K, top-k or routing and would split groups spuriously
    placed = [row for row in rows if row.get("_was", row["status"]) in FINAL_STATUSES]
    parsed = [
        {
            k: v
            for k, v in parse_overrides(row.get("overrides") or []).items()
            if k not in _NOT_CONTEXT
        }
        for row in placed
    ]
    keys = sorted({key for items in parsed for key in items})
    by_base: dict[tuple[Any, ...], list[dict[str, str]]] = defaultdict(list)
    for row, items in zip(placed, parsed, strict=True):
        by_base[_fields(row)[:-1]].append(items)
    splitting = {
        base: [k for k in keys if len({items.get(k, _UNSET) for items in group}) > 1]
        for base, group in by_base.items()
    }
    context_keys = sorted({k for split in splitting.values() for k in split})
    for row, items in zip(placed, parsed, strict=True):
        base = _fields(row)[:-1]
        row["context"] = " ".join(f"{k}={items.get(k, _UNSET)}" for k in context_keys)
        row["base_group"] = group_label(*base[1:])
        swept = [(k, items.get(k, _UNSET)) for k in splitting[base]]
        row["group"] = group_label(*base[1:], swept=swept)


def load_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job of the sweep(s) below ``sweep_dir``.

    Jobs are the job dirs found (see :func:`find_run_dirs`) plus, for every sweep dir holding
    Hydra's ``multirun.yaml``, the planned jobs that never started (status ``missing``, with
    ``run_dir`` where Hydra would have put them). Runs of the same config and seed (a sweep and
    its rerun under one parent dir) count once: the newest completed one; the others are
    ``superseded``.

    Columns: ``run_name`` (the job dir relative to ``sweep_dir``), ``group`` (see
    :func:`group_label`; null for runs without a valid summary), ``status`` (module docstring),
    ``detail`` (why a run is not completed), every field of :class:`~moe_lab.run.record.RunSummary`
    (``diverged_at`` split into ``diverged_at_epoch`` and ``diverged_at_step``; ``overrides``
    joined with spaces), ``context`` (the swept overrides that split groups, as ``key=value``
    words), ``base_group`` (the group's label without them), ``superseded_by``,
    ``started`` (False for a planned job that never started), ``run_dir_recorded`` (the
    ``run_dir`` the run wrote, possibly on another machine),
    ``summary_path``, then any extra field a summary holds. ``run_dir`` is where the job dir is
    now.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
        ValueError: ``sweep_dir`` is a file, holds no job and plans none, or a ``multirun.yaml``
            cannot be parsed.

    A job whose files cannot be read or break the record gives an ``invalid`` row and a warning
    naming the file and the problem (e.g. ``summary.json missing fields ['test_acc']``).
    """
    sweep = _check_sweep_dir(sweep_dir)
    if (sweep / SUMMARY_FILE).is_file():
        run_dirs, unreadable, sweep_dirs = [sweep], {}, []
    else:
        run_dirs, unreadable, sweep_dirs = _scan(sweep)
    plans = [plan for plan in (read_plan(d) for d in sweep_dirs) if plan is not None]

    rows = []
    for run_dir in run_dirs:
        row = _read_job(run_dir, unreadable.get(run_dir))
        row["_dir"] = run_dir
        rows.append(row)
    # Planned jobs that no job dir ran (matched by their overrides, or by the dir Hydra gave them).
    seen_dirs = {row["_dir"] for row in rows}
    seen = {override_identity(row.get("overrides")) for row in rows if row.get("overrides")}
    for plan in plans:
        for job in plan.jobs or []:
            if job.run_dir in seen_dirs or job.identity in seen:
                continue
            rows.append(_planned_row(plan, job, sweep))
    if not rows:
        raise ValueError(
            f"no runs found in sweep dir {str(sweep)!r}: expected one sub-dir per job holding "
            "summary.json (e.g. SWEEP/0/summary.json); is this the multirun's sweep dir?"
        )
    for row in rows:
        run_dir = row.pop("_dir")
        row["run_dir_recorded"] = row.pop("run_dir", None)
        row["run_dir"] = str(run_dir)
        row["run_name"] = (
            Path(run_dir).relative_to(sweep).as_posix() if run_dir != sweep else Path(run_dir).name
        )
    _mark_superseded(rows)
    _assign_groups(rows)
    for row in rows:
        row.pop("_mtime", None)
        row.pop("_was", None)
        overrides = row.get("overrides")
        if isinstance(overrides, list):
            row["overrides"] = " ".join(str(item) for item in overrides)
        for key, value in list(row.items()):
            if isinstance(value, dict | list):  # extra nested fields: keep them as JSON text
                row[key] = json.dumps(value, sort_keys=True)

    runs = pd.DataFrame(rows)
    for column in _RUN_COLUMNS:
        if column not in runs.columns:
            runs[column] = None
    for column in (*NUMERIC_FIELDS, "diverged_at_epoch", "diverged_at_step"):
        numbers = pd.to_numeric(runs[column], errors="coerce")
        whole = numbers.dropna()
        # Counts and ids stay integers (nullable Int64) so summary.csv shows 1000, not 1000.0.
        if column not in (*ACCURACY_FIELDS, "wall_time_s") and (whole == whole.round()).all():
            numbers = numbers.astype("Int64")
        runs[column] = numbers
    runs["context"] = runs["context"].fillna("")
    runs["started"] = runs["started"].fillna(True).astype(bool)
    extra = [c for c in runs.columns if c not in _RUN_COLUMNS]
    return runs[list(_RUN_COLUMNS) + extra].reset_index(drop=True)


def group_keys(runs: pd.DataFrame) -> list[str]:
    """The group-key columns for ``runs``: data, model, n_experts, plus top_k and routing if any
    run sets them, plus ``context`` when some override is swept."""
    keys = ["data", "model", "n_experts"]
    for key in _OPTIONAL_GROUP_KEYS:
        if key in runs.columns and runs[key].notna().any():
            keys.append(key)
    if "context" in runs.columns and (runs["context"].fillna("") != "").any():
        keys.append("context")
    return keys


def sweep_plans(sweep_dir: str | Path) -> list[SweepPlan]:
    """The plans (``multirun.yaml``) of the sweep dirs at or below ``sweep_dir``."""
    sweep = _check_sweep_dir(sweep_dir)
    if (sweep / SUMMARY_FILE).is_file():
        return []
    return [plan for plan in (read_plan(d) for d in _scan(sweep)[2]) if plan is not None]


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
        missing = [c for c in _CURVE_COLUMNS if c not in metrics.columns]
        if missing:
            raise ValueError(
                f"{path}: metrics.csv missing columns {missing} (the columns are MetricsRow's, "
                "moe_lab/run/record.py)"
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
    tidy["kind"] = parsed["kind"].fillna("entropy")
    tidy["expert"] = pd.to_numeric(parsed["expert"]).astype("Int64")
    tidy["value"] = tidy["value"].astype(float)
    return tidy.drop(columns="column").reset_index(drop=True)
