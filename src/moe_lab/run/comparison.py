"""A comparison dir's own files, each named once here with its typed reader and writer.

An equal-budget comparison (``python -m moe_lab.compare``) keeps, beside its ordinary run dirs
(``tune/<arm>/trial_<i>/``, ``final/<arm>/seed_<s>/``):

- ``comparison.json`` (:data:`MARKER`): one :class:`ComparisonRecord`, the settings it started
  with; it marks the dir as a comparison;
- ``study.db`` (:data:`STUDY_DB`): Optuna's SQLite storage, one study per arm (study name = arm);
- ``sessions.jsonl`` (:data:`SESSIONS`): one :class:`Session` line per process that ran it;
- ``.heartbeat.json`` (:data:`HEARTBEAT`): the running session's start and its latest beat (every
  few seconds); a session that a kill cut off leaves it behind, and the next one records that
  session's wall time from it (up to its last beat);
- ``comparison.log`` (:data:`LOG`): what each session launched and what came back, a line each;
- ``.compare.lock`` / ``.jobs.lock``: held by the comparison process (exclusive) and by each of
  its running jobs (shared);
- ``<stage>/<arm>/.killed/``: the leftovers of runs that a kill cut off before their first
  checkpoint, moved aside (never deleted) before the run starts over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_lab.run.record import JsonRecord
from moe_lab.utils.io import atomic_write_json

MARKER = "comparison.json"
STUDY_DB = "study.db"
SESSIONS = "sessions.jsonl"
LOG = "comparison.log"
LOCK = ".compare.lock"
JOBS_LOCK = ".jobs.lock"
KILLED_DIR = ".killed"
HEARTBEAT = ".heartbeat.json"
#: ``kind`` of every record this package writes.
MARKER_KIND = "moe_lab.compare"


class NotAComparison(ValueError):
    """The dir is no comparison dir, or its record cannot be read (the message says which)."""


@dataclass
class ComparisonRecord(JsonRecord):
    """``comparison.json``: what a comparison was started with (fields in the file's order: what
    it is and where it came from first, the settings last)."""

    kind: str = MARKER_KIND
    version: int = 1
    experiment: str | None = None
    created: str = field(default_factory=lambda: dt.datetime.now().isoformat(timespec="seconds"))
    command: str = ""
    baseline: str | None = None
    #: trials launched together (compare.batch_size, or one per arm per launcher worker) as the
    #: comparison started: which trials TPE proposes depends on it, so a resume keeps it
    batch_size: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


#: How a session ended: it finished its work, a signal or a failure stopped it (resumable), or
#: it was killed (its wall time is up to its last heartbeat).
SESSION_ENDS = ("finished", "stopped", "killed")


@dataclass
class Session:
    """One line of ``sessions.jsonl``: a process that ran the comparison, and for how long."""

    started: str
    wall_time_s: float
    resumed: bool
    ended: str = "finished"


# -- the dir's layout: studies and run dirs ----------------------------------------------------


def study_name(arm: str, replicate: int) -> str:
    """The Optuna study of an arm's replicate: the arm's name (replicate 0, as every comparison
    before replicates), ``<arm>@r<r>`` for the others."""
    return arm if replicate == 0 else f"{arm}@r{replicate}"


def parse_study_name(name: str) -> tuple[str, int]:
    """``(arm, replicate)`` of a study name (:func:`study_name`)."""
    arm, sep, rest = name.rpartition("@r")
    return (arm, int(rest)) if sep and rest.isdigit() else (name, 0)


def _replicate_part(replicate: int, replicates: int) -> tuple[str, ...]:
    return () if replicates == 1 else (f"r{replicate}",)


def tune_dir(arm: str, replicate: int, trial: int, replicates: int) -> Path:
    """``tune/<arm>/trial_<i>`` (``tune/<arm>/r<r>/trial_<i>`` with several replicates),
    relative to the comparison dir."""
    return Path("tune", arm, *_replicate_part(replicate, replicates), f"trial_{trial:03d}")


def final_dir(arm: str, replicate: int, seed: int, replicates: int) -> Path:
    """``final/<arm>/seed_<s>`` (``final/<arm>/r<r>/seed_<s>`` with several replicates)."""
    return Path("final", arm, *_replicate_part(replicate, replicates), f"seed_{seed}")


def is_comparison_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_record(comparison_dir: str | Path) -> ComparisonRecord:
    """The dir's :class:`ComparisonRecord`.

    Raises:
        NotAComparison: no such dir, no ``comparison.json``, or one that is unreadable or not a
            moe_lab comparison record.
    """
    path = Path(comparison_dir).expanduser()
    hint = "pass the dir a comparison printed, e.g. outputs/compare/<experiment>/<time>_<id>"
    if not path.is_dir():
        raise NotAComparison(f"{comparison_dir}: no such directory; {hint}")
    marker = path / MARKER
    if not marker.is_file():
        raise NotAComparison(
            f"{comparison_dir} is not a comparison dir (it has no {MARKER}); {hint}"
        )
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotAComparison(f"{marker} is unreadable ({err})") from None
    if not isinstance(data, dict) or data.get("kind") != MARKER_KIND:
        raise NotAComparison(f"{marker} is not a moe_lab comparison record")
    if not isinstance(data.get("settings"), dict):
        raise NotAComparison(f"{marker} is not a comparison record (no settings)")
    return ComparisonRecord.from_dict(data)


def write_record(comparison_dir: Path, record: ComparisonRecord) -> Path:
    return atomic_write_json(comparison_dir / MARKER, record.to_dict())


def study_storage(comparison_dir: Path) -> str:
    """Optuna's storage URL of the dir's ``study.db``."""
    return f"sqlite:///{comparison_dir / STUDY_DB}"


def has_study_db(comparison_dir: Path) -> bool:
    return (comparison_dir / STUDY_DB).is_file()


def append_session(comparison_dir: Path, session: Session) -> None:
    with open(comparison_dir / SESSIONS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(dataclasses.asdict(session)) + "\n")


def read_sessions(comparison_dir: Path) -> list[dict[str, Any]]:
    """The dir's sessions, in order (a line that is not JSON is skipped)."""
    path = comparison_dir / SESSIONS
    if not path.is_file():
        return []
    sessions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            sessions.append(json.loads(line))
    return sessions


def write_heartbeat(comparison_dir: Path, started: str, wall_time_s: float, resumed: bool) -> None:
    """The running session so far (rewritten every few seconds while it runs)."""
    session = Session(started, round(wall_time_s, 1), resumed, ended="killed")
    atomic_write_json(comparison_dir / HEARTBEAT, dataclasses.asdict(session))


def settle_heartbeat(comparison_dir: Path) -> Session | None:
    """A session a kill cut off: its line in ``sessions.jsonl`` (wall time up to its last beat),
    added now, and its heartbeat removed. None when there was none."""
    path = comparison_dir / HEARTBEAT
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        session = Session(
            **{k: data[k] for k in ("started", "wall_time_s", "resumed")}, ended="killed"
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # half a beat: nothing to add
        path.unlink(missing_ok=True)
        return None
    # a session that ended but was killed before it removed its heartbeat has its line already
    if all(line.get("started") != session.started for line in read_sessions(comparison_dir)):
        append_session(comparison_dir, session)
    path.unlink(missing_ok=True)
    return session


def end_heartbeat(comparison_dir: Path) -> None:
    (comparison_dir / HEARTBEAT).unlink(missing_ok=True)


def append_log(comparison_dir: Path, message: str) -> None:
    with open(comparison_dir / LOG, "a", encoding="utf-8") as handle:
        handle.write(f"{dt.datetime.now().isoformat(timespec='seconds')} {message}\n")


__all__ = [
    "HEARTBEAT",
    "JOBS_LOCK",
    "KILLED_DIR",
    "LOCK",
    "LOG",
    "MARKER",
    "MARKER_KIND",
    "SESSIONS",
    "SESSION_ENDS",
    "STUDY_DB",
    "ComparisonRecord",
    "NotAComparison",
    "Session",
    "append_log",
    "append_session",
    "end_heartbeat",
    "final_dir",
    "has_study_db",
    "is_comparison_dir",
    "parse_study_name",
    "read_record",
    "read_sessions",
    "settle_heartbeat",
    "study_name",
    "study_storage",
    "tune_dir",
    "write_heartbeat",
    "write_record",
]
