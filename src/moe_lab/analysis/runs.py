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
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from moe_lab.run.jacobian_record import RECORD_FILE as JACOBIAN_RECORD_FILE
from moe_lab.run.labels import group_label
from moe_lab.run.record import (
    ACCURACY_FIELDS,
    CHECKPOINT_DIR,
    FINAL_STATUSES,
    HYDRA_DIR,
    METRICS_FILE,
    NUMERIC_FIELDS,
    SUMMARY_FIELDS,
    SUMMARY_FILE,
)
from moe_lab.run.sweep import (
    MULTIRUN_FILE,
    SweepPlan,
    override_identity,
    parse_overrides,
    read_plan,
)

from .run_rows import fields_from_overrides, read_job

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
_RUN_MARKERS = frozenset((SUMMARY_FILE, METRICS_FILE, HYDRA_DIR, CHECKPOINT_DIR))
_NOT_JOBS = frozenset(("wandb", CHECKPOINT_DIR))
# a Jacobian-experiment run dir (it has .hydra/ and a log, but trained nothing)
_JACOBIAN_RECORD = JACOBIAN_RECORD_FILE


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


RUN_COLUMNS = _run_columns()


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
        if MULTIRUN_FILE in names:
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
    fields_from_overrides(row, list(job.overrides))
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
        row = read_job(run_dir, unreadable.get(run_dir))
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
    for column in RUN_COLUMNS:
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
    extra = [c for c in runs.columns if c not in RUN_COLUMNS]
    return runs[list(RUN_COLUMNS) + extra].reset_index(drop=True)


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
