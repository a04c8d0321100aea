"""A comparison's jobs and what they came back with: a :class:`Job` (a trial or a final run), its
:class:`Outcome` read from what the launcher returned and the run's record, and a trial's
proposal as its study keeps it.

A run that did not finish (a signal, a full disk, a worker the OS killed) is ``interrupted``:
never a result, always resumable. Only ``completed``, ``failed`` and ``diverged`` settle a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus

from moe_lab.run.record import SUMMARY_FILE
from moe_lab.run.record import read_summary_data as read_summary

#: Run outcomes that settle a run: it is never launched again. Anything else (``interrupted``:
#: a signal, a full disk, a killed worker) leaves it for a resume.
FINISHED_STATUSES = ("completed", "failed", "diverged")
#: A trial's proposal (run dir, seed, arm, replicate, parameters and whether the sampler chose
#: them from the results so far), written in ONE storage write after Optuna made the trial: a
#: trial without it was cut off mid-proposal and never ran.
PROPOSAL = "proposal"
#: Set on a trial whose proposal a kill cut off: it never ran and takes no place in the budget.
ABANDONED = "abandoned"


@dataclass
class Job:
    stage: str  # "tune" | "final"
    arm: str
    replicate: int
    run_dir: Path
    seed: int
    params: dict[str, Any]
    trial_number: int | None = None
    trial_id: int | None = None
    resume: bool = False  # continue from the run's last checkpoint


@dataclass
class Outcome:
    status: str
    value: float | None
    summary: dict[str, Any] | None
    error: str | None = None


def is_finished(summary: dict[str, Any] | None) -> bool:
    return summary is not None and summary.get("status") in FINISHED_STATUSES


def proposal_of(frozen: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    """The trial's whole proposal, or None when a kill cut it off before it was recorded.
    (Comparisons from before the one-write proposal recorded ``run_dir``, ``seed`` and ``arm``
    one by one after Optuna had set every parameter: all three present is a whole proposal.)"""
    attrs = frozen.user_attrs
    proposal = attrs.get(PROPOSAL)
    if isinstance(proposal, dict):
        return proposal
    if all(attrs.get(key) is not None for key in ("run_dir", "seed", "arm")):
        return {"run_dir": attrs["run_dir"], "seed": attrs["seed"], "params": frozen.params}
    return None


def outcome_of_summary(
    summary: dict[str, Any] | None, error: str | None = None, ended: bool = True
) -> Outcome:
    """The outcome a run's record (and the launcher's error) says. ``ended``: the job's process
    returned; if it did not (killed, or the launcher failed), a record that is not final makes
    the run ``interrupted``, to be resumed, never a result."""
    if not is_finished(summary) and not ended:
        return Outcome("interrupted", None, summary, error or "the job's process ended early")
    if summary is None:
        return Outcome("failed", None, None, error or f"the job wrote no {SUMMARY_FILE}")
    status = summary.get("status")
    value = summary.get("val_acc_best")
    if status == "completed":
        if isinstance(value, int | float) and math.isfinite(value):
            return Outcome("completed", float(value), summary)
        return Outcome("failed", None, summary, "completed without a validation accuracy")
    return Outcome(str(status), None, summary, summary.get("error_message") or error)


def outcome_of_return(job: Job, ret: JobReturn) -> Outcome:
    """The outcome of a job the launcher ran: what it returned, else its run's record."""
    summary: dict[str, Any] | None = None
    error: str | None = None
    try:
        value = ret.return_value  # re-raises what the job raised
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    else:
        if ret.status == JobStatus.COMPLETED and isinstance(value, dict):
            summary = value
    return outcome_of_summary(summary or read_summary(job.run_dir), error, ended=error is None)


__all__ = [
    "ABANDONED",
    "FINISHED_STATUSES",
    "PROPOSAL",
    "Job",
    "Outcome",
    "is_finished",
    "outcome_of_return",
    "outcome_of_summary",
    "proposal_of",
]
