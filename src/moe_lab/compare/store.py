"""The comparison dir as the running comparison holds it: its record, locks, studies and log.

:func:`open_store` creates a new comparison dir, or reopens the one ``resume=`` names after
checking that it really is a comparison started with the same settings; either way it takes the
dir's lock, and the :class:`ComparisonStore` it returns is what the runner reads and writes
through. The dir's files are named, and their records defined, in :mod:`moe_lab.run.comparison`.

Locks: the comparison process holds :data:`~moe_lab.run.comparison.LOCK` exclusively for as long
as it runs; each of its jobs holds :data:`~moe_lab.run.comparison.JOBS_LOCK` shared while it runs
(:func:`hold_job_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from moe_lab.config import ConfigError
from moe_lab.run.comparison import (
    JOBS_LOCK,
    KILLED_DIR,
    LOCK,
    MARKER,
    STUDY_DB,
    ComparisonRecord,
    NotAComparison,
    Session,
    append_log,
    append_session,
    has_study_db,
    is_comparison_dir,
    read_record,
    settle_heartbeat,
    study_name,
    study_storage,
    tune_dir,
    write_heartbeat,
    write_record,
)
from moe_lab.run.record import read_summary_data as read_summary
from moe_lab.run.record import write_summary_data
from moe_lab.run.sweep import MULTIRUN_FILE
from moe_lab.utils.io import atomic_write_text

from .settings import CompareSettings

__all__ = [
    "HEARTBEAT_S",
    "ComparisonStore",
    "Heartbeat",
    "check_study",
    "hold_job_lock",
    "open_store",
    "read_marker",
    "read_summary",
]


def read_marker(comparison_dir: str | Path) -> ComparisonRecord:
    """The record of the comparison that ``resume=comparison_dir`` names.

    Raises:
        ConfigError: the dir is no comparison dir, its record is unreadable, or its study is
            missing (the message starts with ``resume=<dir>``).
    """
    path = Path(comparison_dir).expanduser()
    try:
        record = read_record(comparison_dir)
    except NotAComparison as err:
        if not path.is_dir():
            raise ConfigError(f"resume={err}") from None
        if not is_comparison_dir(path):
            raise ConfigError(
                f"resume={err}. (To continue a single killed run, use python -m moe_lab.train "
                "resume=RUN_DIR.)"
            ) from None
        raise ConfigError(f"resume={comparison_dir}: {err}") from None
    if not has_study_db(path):
        raise ConfigError(f"resume={comparison_dir}: {path / STUDY_DB} is missing")
    return record


def _try_exclusive_lock(handle: Any) -> bool:
    """Take an exclusive ``flock`` on the open file without waiting; False if another process
    holds any lock on it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hold_job_lock(comparison_dir: str | Path) -> Iterator[None]:
    """Hold the comparison's jobs lock (shared) while a trial or final run runs."""
    path = Path(comparison_dir) / JOBS_LOCK
    if not path.parent.is_dir():
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _take_lock(comparison_dir: Path) -> IO[str]:
    """One comparison process per dir, and none while jobs of a killed one still run.

    Killing only the comparison's process leaves its parallel workers running their jobs
    (joblib's workers outlive it); resuming then would run the same trial twice in one dir, so it
    is refused until they have ended. Returns the open lock file, to be held until exit.
    """
    handle = open(comparison_dir / LOCK, "a+")  # noqa: SIM115  (held until exit)
    busy = None
    if not _try_exclusive_lock(handle):
        busy = (
            f"{comparison_dir} is in use by another running comparison; wait for it to end, or "
            "stop it, before resuming"
        )
    else:
        with open(comparison_dir / JOBS_LOCK, "a+") as jobs:
            if not _try_exclusive_lock(jobs):
                busy = (
                    f"jobs of the stopped comparison in {comparison_dir} are still running (its "
                    "parallel workers outlive a killed comparison process); wait for them to "
                    "end or stop them (e.g. kill its whole process group), then resume"
                )
            else:
                fcntl.flock(jobs, fcntl.LOCK_UN)
    if busy is not None:
        handle.close()
        raise ConfigError(busy)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


#: Seconds between the running session's heartbeats.
HEARTBEAT_S = 5.0


class Heartbeat:
    """A daemon thread that rewrites the session's heartbeat every :data:`HEARTBEAT_S` seconds,
    so a kill at any instant leaves the session's wall time (up to its last beat) on disk."""

    def __init__(self, path: Path, started_at: str, started: float, resumed: bool) -> None:
        self._done = threading.Event()

        def beat() -> None:
            while True:
                with contextlib.suppress(OSError):  # a full disk must not end the comparison
                    write_heartbeat(path, started_at, time.perf_counter() - started, resumed)
                if self._done.wait(HEARTBEAT_S):
                    return

        self._thread = threading.Thread(target=beat, name="moe_lab-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=HEARTBEAT_S)


class ComparisonStore:
    """An open comparison dir, locked by this process (:func:`open_store` makes one)."""

    def __init__(self, path: Path, lock: IO[str], batch_size: int = 1) -> None:
        self.path = path
        self._lock = lock
        #: trials launched together (recorded in comparison.json, kept on resume)
        self.batch_size = batch_size

    def close(self) -> None:
        """Release the dir's lock (the process's exit releases it too)."""
        self._lock.close()

    def relative(self, path: Path) -> str:
        """``path`` below the comparison dir, as the record and the log write it."""
        return path.relative_to(self.path).as_posix()

    def log(self, message: str) -> None:
        """A line in ``comparison.log`` (the log is a courtesy: a full disk does not stop us)."""
        with contextlib.suppress(OSError):
            append_log(self.path, message)

    def add_session(
        self, started: str, wall_time_s: float, resumed: bool, ended: str = "finished"
    ) -> None:
        """One line per session (a resumed comparison has several): the report sums them."""
        append_session(self.path, Session(started, round(wall_time_s, 1), resumed, ended))

    def studies(self, arms: Iterable[str], replicates: int) -> dict[tuple[str, int], optuna.Study]:
        """One study per arm and replicate (:func:`~moe_lab.run.comparison.study_name`) in the
        dir's storage, created on first use; keyed ``(arm, replicate)``, replicates outermost
        (a resumed dir's study was checked when it was opened: :func:`check_study`)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return {
            (arm, r): optuna.create_study(
                storage=study_storage(self.path),
                study_name=study_name(arm, r),
                direction="maximize",
                load_if_exists=True,
            )
            for r in range(replicates)
            for arm in arms
        }

    def set_aside(self, run_dir: Path) -> None:
        """Move a killed run's leftovers out of the way before it starts over (kept, not lost)."""
        if not run_dir.exists() or not any(run_dir.iterdir()):
            return
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        target = run_dir.parent / KILLED_DIR / f"{run_dir.name}_{stamp}_{os.getpid()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir), str(target))
        summary = read_summary(target)
        if summary is not None and summary.get("status") == "running":
            # the attempt is over: its record says how it ended, not that it still runs
            summary.update(
                status="interrupted",
                error_type="RunInterrupted",
                error_message="cut off by a kill before its first checkpoint; the run started "
                f"over in {run_dir}",
            )
            write_summary_data(target, summary)
        self.log(f"set aside the leftovers of {self.relative(run_dir)} in {target}")


_TRIAL_DIR = re.compile(r"^trial_(\d+)$")


def check_study(path: Path, arms: Iterable[str], replicates: int = 1) -> None:
    """Refuse a comparison dir whose ``study.db`` cannot be read, or disagrees with the trial
    dirs on disk (an emptied or replaced study would silently restart tuning).

    Raises:
        ConfigError: one line naming the file, what is wrong, and what to do.
    """
    db = path / STUDY_DB
    keep = (
        "the trials' run dirs under tune/ keep every finished trial's result; restore "
        f"{STUDY_DB} from a backup, or start a new comparison"
    )
    if db.stat().st_size == 0:
        raise ConfigError(f"{db} is empty (0 bytes): its trials are lost; {keep}")
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        counts = {
            s.study_name: s.n_trials
            for s in optuna.get_all_study_summaries(storage=study_storage(path))
        }
    except Exception as err:  # sqlalchemy's DatabaseError and the like: say it in one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{db} is not a readable Optuna study ({first}); {keep}") from None
    for arm in arms:
        for r in range(replicates):
            trials_dir = path / tune_dir(arm, r, 0, replicates).parent
            numbers = [
                int(match.group(1))
                for child in trials_dir.glob("trial_*")
                if (match := _TRIAL_DIR.match(child.name)) and read_summary(child) is not None
            ]
            n = counts.get(study_name(arm, r), 0)
            if numbers and max(numbers) >= n:
                raise ConfigError(
                    f"{db} holds {n} trial(s) of study {study_name(arm, r)!r}, but "
                    f"{trials_dir.relative_to(path)}/ has run dirs up to trial_{max(numbers):03d}: "
                    f"the study was emptied or replaced and would rerun finished trials; {keep}"
                )


def _kept_batch_size(settings: CompareSettings, record: ComparisonRecord, now: int) -> int:
    """The batch size a resume launches with: the recorded one (which trials TPE proposes
    depends on it, so a resume under another launcher or n_jobs proposes exactly what the
    uninterrupted comparison would have); ConfigError when the command asks for another."""
    if record.batch_size is None:  # recorded before comparisons kept it
        return now
    if settings.batch_size is not None and settings.batch_size != record.batch_size:
        raise ConfigError(
            f"resume={settings.resume}: the comparison was started with batch size "
            f"{record.batch_size} (trials launched together, which decides what TPE proposes); "
            f"a resume keeps it: drop compare.batch_size={settings.batch_size} or set it to "
            f"{record.batch_size}"
        )
    return record.batch_size


def open_store(
    settings: CompareSettings, config: DictConfig, command: str, batch_size: int
) -> ComparisonStore:
    """The comparison dir, locked: the one ``settings.resume`` names, after checking that it was
    started with the same settings, or else a new one in ``compare.dir`` with its record.
    ``batch_size``: the trials this launcher would launch together; a new comparison records
    it, a resume keeps the recorded one (:attr:`ComparisonStore.batch_size`).

    Points ``hydra.sweep.dir`` of ``config`` at the dir: the launchers create it, and the report
    callback reads it.

    Raises:
        ConfigError: the dir cannot be resumed (not a comparison, other settings, in use) or
            already holds a comparison.
    """
    resume = settings.resume
    if resume is not None:
        record = read_marker(resume)
        differing = settings.differences(record.settings)
        if differing:
            now = settings.to_record()
            details = "; ".join(
                f"{key}: started with {record.settings.get(key)!r}, now {now[key]!r}"
                for key in differing
            )
            raise ConfigError(
                f"resume={resume}: the comparison was started with different settings "
                f"({details}). Repeat the original command with resume= added: "
                f"{record.command}"
            )
        path = resume
        batch_size = _kept_batch_size(settings, record, batch_size)
    else:
        path = Path(str(OmegaConf.select(config, "compare.dir"))).expanduser().resolve()
        if (path / MARKER).exists():
            raise ConfigError(f"{path} already holds a comparison; resume it with resume=")
    path.mkdir(parents=True, exist_ok=True)
    store = ComparisonStore(path, _take_lock(path), batch_size)
    if resume is not None:
        try:  # only once the dir is ours: another comparison may be writing it
            check_study(path, settings.arms, settings.replicates)
        except ConfigError:
            store.close()
            raise
        killed = settle_heartbeat(path)
        if killed is not None:
            store.log(
                f"the session started {killed.started} was killed; its wall time up to its last "
                f"heartbeat ({killed.wall_time_s:.0f} s) is recorded"
            )
    with read_write(config), open_dict(config):
        config.hydra.sweep.dir = str(path)
    if resume is None:
        record = ComparisonRecord(
            settings=json.loads(json.dumps(settings.to_record())),
            experiment=config.get("experiment_name"),
            command=command,
            baseline=settings.baseline,
            batch_size=batch_size,
        )
        write_record(path, record)
        atomic_write_text(path / MULTIRUN_FILE, OmegaConf.to_yaml(config))
    return store
