"""The equal-budget comparison: one Optuna study per arm, trials run as jobs on Hydra's launcher.

:class:`Comparison` is what the ``compare`` sweeper runs. In order:

1. **Checks, before any training** (:mod:`moe_lab.compare.settings`): the arms, the budget
   (``compare.trials >= 1``, ``compare.seeds >= 2``), the search space (every key must exist in
   some arm's config), a held-out validation split (``data.val_split > 0``), every arm's config
   composed and validated, and a ``resume=`` dir that really is a comparison started with the same
   settings (:mod:`moe_lab.compare.store`).
2. **Tuning**: per arm an Optuna study in the comparison dir's SQLite storage. Batches of trials
   (arms interleaved) go to the launcher together; trial ``i`` of every arm trains with seed ``i``
   and ``test=false`` (its data module never loads the test split) in ``tune/<arm>/trial_<i>``.
   Its objective is the run's best validation accuracy. A failed or diverged run is told to Optuna
   as FAIL: it uses up its trial and is never retried. A run that did not finish (a signal, a
   full disk, a worker the OS killed) is not a result: its trial stays open, the comparison stops
   after the batch, and a resume runs it to completion.
3. **Final runs**: each arm's best trial (highest objective, the earliest on ties) re-run with
   ``compare.seeds`` seeds ``final_seed_base + j`` (never a tuning seed) in
   ``final/<arm>/seed_<s>``, each scoring the test set once.
4. The report is written by :class:`moe_lab.compare.report.CompareReportCallback` when the
   multirun ends.

**Resume** (``resume=<comparison dir>``, with the original command's overrides): finished trials
and final runs are not run again. A trial the killed process had launched but not recorded is
settled from its run dir: a run summary with an outcome is told as it stands; otherwise the run
continues from its last checkpoint (:func:`moe_lab.run.record.last_checkpoint`; same trial
number, same hyperparameters, same seed: never counted twice), or starts over in the same dir
when it had no checkpoint yet (its leftovers are moved aside first). Final runs are settled the
same way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from moe_lab.config import ConfigError
from moe_lab.run.comparison import JOBS_LOCK, MARKER, STUDY_DB, end_heartbeat, write_heartbeat
from moe_lab.run.record import SUMMARY_FILE, last_checkpoint
from moe_lab.run.signals import received_signal

from .settings import Arm, CompareSettings
from .space import format_override
from .store import ComparisonStore, hold_job_lock, open_store, read_marker, read_summary

__all__ = [
    "FINISHED_STATUSES",
    "JOBS_LOCK",
    "MARKER",
    "STUDY_DB",
    "Comparison",
    "hold_job_lock",
    "read_marker",
]

#: Run outcomes that settle a run: it is never launched again. Anything else (``interrupted``:
#: a signal, a full disk, a killed worker) leaves it for a resume.
FINISHED_STATUSES = ("completed", "failed", "diverged")
_PREFIX = "[moe_lab compare]"
#: A trial's proposal (run dir, seed, arm, parameters), written in ONE storage write after Optuna
#: made the trial: a trial without it was cut off mid-proposal and never ran.
PROPOSAL = "proposal"
#: Set on a trial whose proposal a kill cut off: it never ran and takes no place in the budget.
ABANDONED = "abandoned"
#: Seconds between the running session's heartbeats.
HEARTBEAT_S = 5.0


class ComparisonStopped(Exception):
    """The comparison stops before its work is done (a signal, or runs that could not finish);
    what it finished is recorded and a resume continues."""

    def __init__(self, reason: str, signum: int | None = None) -> None:
        super().__init__(reason)
        self.signum = signum


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _say(message: str) -> None:
    print(f"{_PREFIX} {message}", flush=True)


def _is_finished(summary: dict[str, Any] | None) -> bool:
    return summary is not None and summary.get("status") in FINISHED_STATUSES


def _proposal_of(frozen: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
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


class _Heartbeat:
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


@dataclass
class Job:
    stage: str  # "tune" | "final"
    arm: str
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


class Comparison:
    """One equal-budget comparison (module docstring). ``run()`` does it all.

    Args:
        config: the composed ``compare`` config (with its ``hydra`` node).
        hydra_context: Hydra's context (its config loader composes each job's config).
        launcher: the configured launcher (basic, joblib, submitit, ...).
        arguments: the command line's overrides.
        grid_params: the preset's ``hydra.sweeper.params`` (its ``model`` entry names the default
            arms).
    """

    def __init__(
        self,
        config: DictConfig,
        hydra_context: HydraContext,
        launcher: Launcher,
        arguments: Sequence[str],
        grid_params: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = launcher
        self.arguments = list(arguments)
        self.grid_params = dict(grid_params or {})
        #: the checked settings (set by run())
        self.spec: CompareSettings | None = None
        #: the open comparison dir (set by _open_dir())
        self.store: ComparisonStore | None = None
        self._job_index = 0

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the comparison dir records (:meth:`CompareSettings.to_record`)."""
        return self._spec.to_record()

    @property
    def dir(self) -> Path:
        return self._store.path

    @property
    def _spec(self) -> CompareSettings:
        assert self.spec is not None, "run() checks the settings first"
        return self.spec

    @property
    def _store(self) -> ComparisonStore:
        assert self.store is not None, "run() opens the comparison dir first"
        return self.store

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict[str, Any]:
        """Check everything, then tune, then run the final seeds. Exits with status 2 and one
        line on stderr for bad input (nothing is trained then)."""
        try:
            self.spec = CompareSettings.from_config(
                self.config, self.hydra_context.config_loader, self.arguments, self.grid_params
            )
            self._open_dir(self.spec.resume)
        except ConfigError as err:
            print(f"moe_lab.compare: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        started, started_at = time.perf_counter(), dt.datetime.now().isoformat(timespec="seconds")
        resumed = self._spec.resume is not None
        beat = _Heartbeat(self.dir, started_at, started, resumed)
        ended, result = "finished", {"dir": str(self.dir)}
        try:
            studies = self._store.studies(self._spec.arms)
            self._tune(studies)
            result["final_runs"] = self._final(studies)
        except ComparisonStopped as stop:
            ended, result["stopped"] = "stopped", str(stop)
            self._store.log(f"stopped: {stop}")
            _say(f"stopped: {stop}; finish it with the same command and resume={self.dir}")
        finally:
            beat.stop()
            try:
                self._store.add_session(started_at, time.perf_counter() - started, resumed, ended)
                end_heartbeat(self.dir)
            except OSError as err:  # e.g. a full disk: the heartbeat still holds the session
                _say(f"could not record this session's wall time ({err})")
        if ended == "finished":
            _say(f"done in {time.perf_counter() - started:.1f} s; comparison dir: {self.dir}")
        return result

    def _open_dir(self, resume: Path | None) -> None:
        command = "python -m moe_lab.compare " + " ".join(self.arguments)
        self.store = open_store(self._spec, self.config, command)
        _say(f"{'resuming the comparison' if resume else 'new comparison'} in {self.dir}")
        self._store.log(
            f"{'resume' if resume else 'start'}: arms {list(self._spec.arms)}, "
            f"{self._spec.trials} trials, {self._spec.seeds} final seeds"
        )

    # ------------------------------------------------------------------ the sampler, the batches
    def _sampler(self, trial_number: int) -> optuna.samplers.BaseSampler:
        # One seed per trial number, the same for every arm: the arms' random trials are paired,
        # and a resumed comparison proposes what the uninterrupted one would have proposed
        # from the same finished trials.
        spec = self._spec
        seed = int(np.random.SeedSequence([spec.sampler_seed, trial_number]).generate_state(1)[0])
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=spec.tpe_startup_trials,
                # trials asked while others run get a pessimistic stand-in value
                constant_liar=True,
            )

    def _batch_size(self) -> int:
        if self._spec.batch_size is not None:
            return self._spec.batch_size
        workers = OmegaConf.select(self.config, "hydra.launcher.n_jobs", default=None)
        if _is_int(workers) and workers < 0:  # joblib: -1 = all cores
            workers = max(1, (os.cpu_count() or 1) + 1 + workers)
        workers = workers if _is_int(workers) and workers > 0 else 1
        # one trial per arm per worker: with arms of unequal speed (cnn_matched takes ~2.5x the
        # cnn's time) a batch of one trial per arm leaves a worker idle while the slowest runs;
        # two per arm on two workers pack them, and TPE still learns every two trials per arm
        return workers * len(self._spec.arms)

    # ------------------------------------------------------------------ running jobs
    def _job_overrides(self, job: Job) -> list[str]:
        arm = self._spec.arms[job.arm]
        return [
            *self._spec.base_args,
            *arm.overrides,
            *(format_override(k, v) for k, v in job.params.items()),
            f"seed={job.seed}",
            f"stage={job.stage}",
            f"arm={job.arm}",
            format_override("trial", job.trial_number if job.stage == "tune" else None),
            f"test={'true' if job.stage == 'final' else 'false'}",
            format_override("resume", str(job.run_dir) if job.resume else None),
            format_override("hydra.sweep.dir", str(self.dir)),
            format_override("hydra.sweep.subdir", self._store.relative(job.run_dir)),
        ]

    def _launch(self, jobs: list[Job]) -> list[Outcome]:
        store = self._store
        for job in jobs:
            if not job.resume:
                store.set_aside(job.run_dir)
            what = "resumes from its checkpoint" if job.resume else "starts"
            store.log(f"{store.relative(job.run_dir)} {what} (seed {job.seed}, {job.params})")
        _say(
            "launching "
            + ", ".join(
                store.relative(j.run_dir) + (" (resumed)" if j.resume else "") for j in jobs
            )
        )
        try:
            returns = self.launcher.launch(
                [self._job_overrides(j) for j in jobs], initial_job_idx=self._job_index
            )
        except Exception as err:  # e.g. joblib's TerminatedWorkerError: a worker was killed
            cause = "a signal" if received_signal() else f"{type(err).__name__}: {err}"
            first = str(cause).splitlines()[0]
            return [
                self._outcome_of_summary(read_summary(j.run_dir), first, ended=False) for j in jobs
            ]
        finally:
            self._job_index += len(jobs)
        return [self._outcome(job, ret) for job, ret in zip(jobs, returns, strict=True)]

    def _outcome(self, job: Job, ret: JobReturn) -> Outcome:
        summary: dict[str, Any] | None = None
        error: str | None = None
        try:
            value = ret.return_value  # re-raises what the job raised
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        else:
            if ret.status == JobStatus.COMPLETED and isinstance(value, dict):
                summary = value
        summary = summary or read_summary(job.run_dir)
        return self._outcome_of_summary(summary, error, ended=error is None)

    @staticmethod
    def _outcome_of_summary(
        summary: dict[str, Any] | None, error: str | None = None, ended: bool = True
    ) -> Outcome:
        """The outcome a run's record (and the launcher's error) says. ``ended``: the job's
        process returned; if it did not (killed, or the launcher failed), a record that is not
        final makes the run ``interrupted``, to be resumed, never a result."""
        if not _is_finished(summary) and not ended:
            cause = error or "the job's process ended without a result"
            return Outcome("interrupted", None, summary, cause)
        if summary is None:
            return Outcome("failed", None, None, error or f"the job wrote no {SUMMARY_FILE}")
        status = summary.get("status")
        value = summary.get("val_acc_best")
        if status == "completed":
            if isinstance(value, int | float) and math.isfinite(value):
                return Outcome("completed", float(value), summary)
            return Outcome("failed", None, summary, "completed without a validation accuracy")
        message = summary.get("error_message") or error
        return Outcome(str(status), None, summary, message)

    def _report(self, job: Job, result: str) -> None:
        where = self._store.relative(job.run_dir)
        self._store.log(f"{where}: {result}")
        _say(f"{where}: {result}")

    # ------------------------------------------------------------------ tuning
    def _tell(self, study: optuna.Study, job: Job, outcome: Outcome) -> None:
        """Record a trial's result in its study; a run that did not finish is no result: its
        trial stays open for a resume."""
        assert job.trial_id is not None and job.trial_number is not None
        if outcome.status not in FINISHED_STATUSES:
            self._report(job, f"{outcome.status}: {outcome.error} (resumable)")
            return
        trial = optuna.trial.Trial(study, job.trial_id)
        trial.set_user_attr("status", outcome.status)
        if outcome.summary is not None:
            for key, attr in (
                ("wall_time_s", "wall_time_s"),
                ("epochs", "epochs"),
                ("val_acc_last", "val_acc_last"),
                ("params", "model_params"),
            ):
                if outcome.summary.get(key) is not None:
                    trial.set_user_attr(attr, outcome.summary[key])
        if outcome.error:
            trial.set_user_attr("error", str(outcome.error)[:2000])
        if outcome.status == "completed":
            study.tell(job.trial_number, outcome.value)
        else:
            study.tell(job.trial_number, state=TrialState.FAIL)
        self._report(
            job,
            f"val acc {outcome.value:.4f}"
            if outcome.value is not None
            else f"{outcome.status}: {outcome.error}",
        )

    def _recover(self, studies: dict[str, optuna.Study]) -> list[Job]:
        """Trials a killed comparison launched but never recorded (state RUNNING in its study)."""
        pending: list[Job] = []
        for name, study in studies.items():
            for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                proposal = _proposal_of(frozen)
                if proposal is None:
                    self._abandon(study, frozen)
                    continue
                run_dir = self.dir / str(proposal["run_dir"])
                job = Job(
                    stage="tune",
                    arm=name,
                    run_dir=run_dir,
                    seed=int(proposal["seed"]),
                    params=dict(proposal["params"]),
                    trial_number=frozen.number,
                    trial_id=frozen._trial_id,
                )
                summary = read_summary(run_dir)
                if _is_finished(summary):
                    self._store.log(
                        f"{self._store.relative(run_dir)} had finished: recorded as it stands"
                    )
                    self._tell(study, job, self._outcome_of_summary(summary))
                    continue
                job.resume = last_checkpoint(run_dir).is_file()
                pending.append(job)
        return pending

    def _abandon(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        """Close a trial whose proposal a kill cut off (it never ran): marked, then failed, so
        that it takes no place in the budget and the report leaves it out."""
        trial = optuna.trial.Trial(study, frozen._trial_id)
        trial.set_user_attr(ABANDONED, True)  # first: a kill before the tell finds it again
        study.tell(frozen.number, state=TrialState.FAIL)
        self._store.log(
            f"arm {study.study_name}: trial {frozen.number} was cut off while it was proposed "
            "(it never ran); it takes no place in the budget"
        )

    def _ask(self, study: optuna.Study, arm: Arm) -> Job:
        number = len(study.get_trials(deepcopy=False))
        study.sampler = self._sampler(number)
        trial = study.ask({key: self._spec.space[key] for key in arm.keys})
        run_dir = self.dir / "tune" / arm.name / f"trial_{trial.number:03d}"
        # one write: a resume finds the whole proposal or none (then the trial never ran)
        proposal = {
            "run_dir": self._store.relative(run_dir),
            "seed": trial.number,
            "arm": arm.name,
            "params": dict(trial.params),
        }
        trial.set_user_attr(PROPOSAL, proposal)
        return Job(
            stage="tune",
            arm=arm.name,
            run_dir=run_dir,
            seed=trial.number,
            params=dict(trial.params),
            trial_number=trial.number,
            trial_id=trial._trial_id,
        )

    @staticmethod
    def _used(study: optuna.Study) -> int:
        """The trials that take a place in the arm's budget (all but abandoned proposals)."""
        return sum(not t.user_attrs.get(ABANDONED) for t in study.get_trials(deepcopy=False))

    def _stop_if_asked(self) -> None:
        signum = received_signal()
        if signum is not None:
            name = signal.Signals(signum).name
            raise ComparisonStopped(f"{name} received", signum)

    def _settle(self, outcomes: list[tuple[Job, Outcome]]) -> None:
        """Stop after a batch in which some run did not finish (its cause named)."""
        self._stop_if_asked()
        cut = [(job, o) for job, o in outcomes if o.status not in FINISHED_STATUSES]
        if cut:
            where = ", ".join(self._store.relative(job.run_dir) for job, _ in cut)
            raise ComparisonStopped(
                f"{len(cut)} run(s) did not finish ({where}): {cut[0][1].error}"
            )

    def _tune(self, studies: dict[str, optuna.Study]) -> None:
        trials, arms = self._spec.trials, self._spec.arms
        self._stop_if_asked()
        pending = self._recover(studies)
        if pending:
            _say(f"{len(pending)} trial(s) were cut off by the kill and continue now")
        batch_size = self._batch_size()
        while True:
            self._stop_if_asked()
            batch, pending = pending[:batch_size], pending[batch_size:]
            used = {name: self._used(study) for name, study in studies.items()}
            while len(batch) < batch_size:
                open_arms = [name for name in arms if used[name] < trials]
                if not open_arms:
                    break
                # arms interleaved: a slow period of the machine, or a kill, hits every arm alike
                name = min(open_arms, key=lambda n: (used[n], list(arms).index(n)))
                batch.append(self._ask(studies[name], arms[name]))
                used[name] += 1
            if not batch:
                break
            outcomes = list(zip(batch, self._launch(batch), strict=True))
            for job, outcome in outcomes:
                self._tell(studies[job.arm], job, outcome)
            self._settle(outcomes)

    # ------------------------------------------------------------------ final runs
    @staticmethod
    def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
        """The completed trial with the highest objective; the earliest of equals."""
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        return max(done, key=lambda t: (t.value, -t.number))

    def _final(self, studies: dict[str, optuna.Study]) -> dict[str, list[str]]:
        jobs: list[Job] = []
        finals: dict[str, list[str]] = {}
        for j, seed in enumerate(self._spec.final_seeds):
            for name, study in studies.items():
                best = self.best_trial(study)
                if best is None:
                    if j == 0:
                        _say(f"arm {name}: no trial completed, so it has no final runs")
                        self._store.log(f"arm {name}: no completed trial; no final runs")
                    continue
                run_dir = self.dir / "final" / name / f"seed_{seed}"
                finals.setdefault(name, []).append(self._store.relative(run_dir))
                if _is_finished(read_summary(run_dir)):
                    continue
                jobs.append(
                    Job(
                        stage="final",
                        arm=name,
                        run_dir=run_dir,
                        seed=seed,
                        params=dict(best.params),
                        resume=last_checkpoint(run_dir).is_file(),
                    )
                )
        if jobs:
            self._stop_if_asked()
            outcomes = list(zip(jobs, self._launch(jobs), strict=True))
            for job, outcome in outcomes:
                test_acc = (outcome.summary or {}).get("test_acc")
                self._report(
                    job,
                    f"test acc {test_acc:.4f}"
                    if outcome.status == "completed" and isinstance(test_acc, int | float)
                    else f"{outcome.status}: {outcome.error}",
                )
            self._settle(outcomes)
        return finals
