"""``run_task``: the one place that turns whatever happened in a run into a recorded status.

Like lightning-hydra-template's ``task_wrapper``, it owns the failure handling, so the entry point
only composes, instantiates and fits. Inside ``with run_task(record, close):``

- a SIGTERM/SIGINT (or Lightning's ``SystemExit``/``KeyboardInterrupt`` for them) ends the run
  ``interrupted``, resumable;
- a :class:`RunStopped` error (e.g. ``moe_lab.lit.DivergedError``) ends it with its own status
  and fields;
- a fault of the machine (a full disk, a quota, a read-only or unwritable run dir) ends it
  ``interrupted``, named in one line: no result, and a resume continues it once fixed;
- any other exception ends it ``failed``, with the error in the record and the traceback in
  ``error.log``; it never sinks the sweep;
- otherwise the run is ``completed``.

Whatever happened, ``close()`` then runs (the trackers' final record and their finish) and the
final ``summary.json`` is written; a second signal during that clean-up cannot cost the record.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L

from moe_lab.run.context import hydra_output_subdir, is_main_process
from moe_lab.run.record import (
    ERROR_LOG,
    RunSummary,
    read_summary,
    summary_path,
    write_summary,
)
from moe_lab.run.signals import RunInterrupted, received_signal, signals_interrupt_the_run
from moe_lab.utils.io import atomic_write_text

log = logging.getLogger("moe_lab.train")


class RunStopped(Exception):
    """An error that ends a run with a status of its own (not ``failed``): :attr:`status`, and
    :meth:`record` for the fields it adds to the run record."""

    status = "failed"

    def record(self, summary: RunSummary) -> None:
        """Add this stop's own fields to ``summary`` (none by default)."""


class SegmentRecord:
    """The run record of one segment of a run (the first, or one resume), as it is written:
    ``summary.json`` with status ``running`` at the start and after every epoch, the outcome at
    the end. Epochs, accuracies and wall time add up over the segments of a resumed run."""

    def __init__(self, summary: RunSummary, run_dir: Path, previous: RunSummary | None) -> None:
        self.summary, self.run_dir, self.previous = summary, run_dir, previous
        self._base_wall = (previous.wall_time_s or 0.0) if previous else 0.0
        summary.segments = (previous.segments if previous else 0) + 1
        summary.wandb_id = previous.wandb_id if previous else None
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return round(self._base_wall + time.perf_counter() - self._start, 3)

    def take_history(self, history: list[dict[str, float]]) -> None:
        accs = [r["val_acc"] for r in history if r.get("val_acc") == r.get("val_acc")]  # no NaN
        self.summary.epochs = len(history)
        self.summary.val_acc_last = accs[-1] if accs else None
        self.summary.val_acc_best = max(accs) if accs else None

    def write(self, history: list[dict[str, float]] | None = None, final: bool = False) -> None:
        summary, previous = self.summary, self.previous
        if history:
            self.take_history(history)
        elif previous is not None and summary.epochs == 0:
            # nothing trained in this segment (yet): keep what the earlier segments reached
            summary.epochs = previous.epochs
            summary.val_acc_last, summary.val_acc_best = (
                previous.val_acc_last,
                previous.val_acc_best,
            )
        if not final:  # the final record keeps the time the trackers were given
            summary.wall_time_s = self.elapsed()
        if is_main_process():  # DDP's other ranks run this too
            write_summary(self.run_dir, summary)


class EpochRecord(L.Callback):
    """Rewrites ``summary.json`` (status ``running``) after every epoch's checkpoint."""

    def __init__(self, record: SegmentRecord) -> None:
        self.record = record

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.write(getattr(pl_module, "history", None))


#: What a failed write says about the machine, not about the run: its errno and its words.
_MACHINE_FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


def machine_fault(err: BaseException, run_dir: Path) -> tuple[str, OSError] | None:
    """``(what, error)`` when ``err`` comes from the machine, not from the run: a full disk, a
    quota, a read-only file system, or a dir of the run that cannot be written; else None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            if seen.errno in _MACHINE_FAULTS:
                return _MACHINE_FAULTS[seen.errno], seen
            mine = seen.filename is not None and Path(str(seen.filename)).is_relative_to(run_dir)
            if isinstance(seen, PermissionError) and mine:
                return "permission denied", seen
        seen = seen.__cause__ or seen.__context__
    return None


def record_failure(summary: RunSummary, err: Exception, run_dir: Path) -> None:
    """Status ``failed`` with the error, the traceback in error.log. A fault of the machine (a
    full disk, an unwritable dir) is no result of the run: status ``interrupted``, named in one
    line, and a resume continues once it is fixed."""
    fault = machine_fault(err, run_dir)
    if fault is not None:
        what, os_error = fault
        summary.status, summary.error_type = "interrupted", "OSError"
        summary.error_message = (
            f"{what} writing {os_error.filename or '(unknown path)'}; fix it, then resume with "
            f"resume={run_dir}"
        )
    else:
        summary.status = "failed"
        summary.error_type, summary.error_message = type(err).__name__, str(err)
    if is_main_process():
        with contextlib.suppress(OSError):
            atomic_write_text(run_dir / ERROR_LOG, traceback.format_exc())
    log.error("run %s: %s: %s", summary.status, summary.error_type, summary.error_message)


@contextlib.contextmanager
def run_task(
    record: SegmentRecord, report: Callable[[], None], close: Callable[[], None]
) -> Iterator[None]:
    """Run the body with signals stopping it, and record its outcome (module docstring):
    ``report()`` gives the trackers the final record before ``summary.json`` is written,
    ``close()`` finishes them after."""
    summary, run_dir = record.summary, record.run_dir
    with signals_interrupt_the_run():
        try:
            try:
                yield
                if received_signal() is not None:  # noted while Lightning held the handler
                    raise RunInterrupted(received_signal())
                summary.status = "completed"
            except (SystemExit, KeyboardInterrupt) as err:
                # Lightning turns SIGTERM and Ctrl-C into these when its own handlers see them first
                raise RunInterrupted(received_signal() or signal.SIGINT) from err
        except RunInterrupted as err:
            summary.status, summary.error_type = "interrupted", "RunInterrupted"
            summary.error_message = f"{err}; resume with resume={run_dir}"
            log.error("run interrupted (%s): resume with resume=%s", err, run_dir)
        except RunStopped as err:
            summary.status, summary.error_type, summary.error_message = (
                err.status, type(err).__name__, str(err),
            )  # fmt: skip
            err.record(summary)
            log.error("run %s: %s", err.status, err)
        except Exception as err:  # a failing job must not sink the sweep: record it and move on
            record_failure(summary, err, run_dir)
        finally:
            # a second signal during the clean-up must not cost the record
            with contextlib.suppress(RunInterrupted):
                summary.wall_time_s = record.elapsed()
                report()
                try:
                    record.write(final=True)
                except OSError as err:
                    fault = machine_fault(err, run_dir)
                    reason = fault[0] if fault else str(err)
                    print(f"error: could not write {summary_path(run_dir)}: {reason}",
                          file=sys.stderr)  # fmt: skip
                close()


def previous_segment(run_dir: Path) -> RunSummary | None:
    """The record of the segment a resume continues (None if there is none or it is unusable)."""
    return read_summary(run_dir)


def drop_resume_record(run_dir: Path) -> None:
    """Remove the ``.hydra_resume_*`` record Hydra wrote for a resume that was refused."""
    subdir = hydra_output_subdir()
    if subdir and subdir.startswith(".hydra_resume_"):
        shutil.rmtree(run_dir / subdir, ignore_errors=True)


def discard_unstarted_job_dir(run_dir: Path) -> None:
    """A job a signal kept from starting leaves no dir, so the report lists it as missing (only
    Hydra's own record and log are removed; anything else keeps the dir)."""
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    if all(p.name == ".hydra" or (p.is_file() and p.suffix == ".log") for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


def exit_code(summary: dict[str, Any]) -> int:
    """``128 + signal`` for a run a signal stopped, else 1 (for a run that did not complete)."""
    if summary["status"] == "interrupted" and received_signal() is not None:
        return 128 + received_signal()  # type: ignore[operator]
    return 1


__all__ = [
    "EpochRecord",
    "RunStopped",
    "SegmentRecord",
    "discard_unstarted_job_dir",
    "drop_resume_record",
    "exit_code",
    "machine_fault",
    "previous_segment",
    "record_failure",
    "run_task",
]
