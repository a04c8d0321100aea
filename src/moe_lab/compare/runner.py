"""The equal-budget comparison: Optuna studies per arm, trials run as jobs on Hydra's launcher.

:class:`Comparison` is what the ``compare`` sweeper runs. In order:

1. **Checks, before any training** (:mod:`moe_lab.compare.settings`): the arms, the budget
   (``compare.trials >= 1``, ``compare.seeds >= 2``, ``compare.replicates >= 1``), the search
   space (every key must exist in some arm's config), a held-out validation split
   (``data.val_split > 0``), every arm's config composed and validated and its model built, and a
   ``resume=`` dir that really is a comparison started with the same settings
   (:mod:`moe_lab.compare.store`).
2. **Tuning**: per arm ``compare.replicates`` independent Optuna studies (replicate ``r``: its own
   sampler seeds, tuning seeds ``r·trials + i``) in the comparison dir's SQLite storage. Batches
   of trials (arms and replicates interleaved; the batch size is recorded and kept on resume) go to
   the launcher together; each trains with ``test=false`` (its data module never loads the test
   split) in ``tune/<arm>/trial_<i>`` (``tune/<arm>/r<r>/trial_<i>`` with replicates). Its
   objective is the run's best validation accuracy. A failed or diverged run is told to Optuna
   as FAIL: it uses up its trial and is never retried. A run that did not finish (a signal, a
   full disk, a worker the OS killed) is not a result: its trial stays open, the comparison stops
   after the batch, and a resume runs it to completion.
3. **Final runs**: each study's best trial (highest objective, the earliest on ties) re-run with
   ``compare.seeds`` seeds ``final_seed_base + r·seeds + j`` (never a tuning seed; the same in
   every arm, so the arms' final runs are paired) in ``final/<arm>/seed_<s>``, each scoring the
   test set once and keeping each test example's prediction.
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

import datetime as dt
import os
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from moe_lab.config import ConfigError
from moe_lab.run.comparison import JOBS_LOCK, MARKER, STUDY_DB, end_heartbeat, final_dir, tune_dir
from moe_lab.run.record import last_checkpoint, read_summary_data
from moe_lab.run.signals import received_signal

from .jobs import (
    ABANDONED,
    FINISHED_STATUSES,
    PROPOSAL,
    Job,
    Outcome,
    is_finished,
    outcome_of_return,
    outcome_of_summary,
    proposal_of,
)
from .settings import CompareSettings
from .space import format_override
from .store import ComparisonStore, Heartbeat, hold_job_lock, open_store, read_marker

__all__ = [
    "FINISHED_STATUSES",
    "JOBS_LOCK",
    "MARKER",
    "STUDY_DB",
    "Comparison",
    "hold_job_lock",
    "read_marker",
]

_PREFIX = "[moe_lab compare]"
#: A study of the comparison: ``(arm, replicate)``.
StudyKey = tuple[str, int]


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
        beat = Heartbeat(self.dir, started_at, started, resumed)
        ended, result = "finished", {"dir": str(self.dir)}
        try:
            studies = self._store.studies(self._spec.arms, self._spec.replicates)
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
        self.store = open_store(self._spec, self.config, command, self._launcher_batch_size())
        _say(f"{'resuming the comparison' if resume else 'new comparison'} in {self.dir}")
        self._store.log(
            f"{'resume' if resume else 'start'}: arms {list(self._spec.arms)}, "
            f"{self._spec.trials} trials x {self._spec.replicates} replicate(s), "
            f"{self._spec.seeds} final seeds, batches of {self._store.batch_size}"
        )

    # ------------------------------------------------------------------ the sampler, the batches
    def _sampler(self, replicate: int, trial_number: int) -> optuna.samplers.BaseSampler:
        # One seed per (replicate, trial number), the same for every arm: the arms' random trials
        # are paired, each replicate draws its own, and a resumed comparison proposes what the
        # uninterrupted one would have proposed from the same finished trials.
        spec = self._spec
        entropy = [spec.sampler_seed, trial_number] if replicate == 0 else [
            spec.sampler_seed, replicate, trial_number
        ]  # fmt: skip
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
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

    def _launcher_batch_size(self) -> int:
        """Trials launched together: ``compare.batch_size``, else one per arm per launcher
        worker (a new comparison records it; a resume keeps the recorded one)."""
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
            format_override("replicate", job.replicate),
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
                outcome_of_summary(read_summary_data(j.run_dir), first, ended=False) for j in jobs
            ]
        finally:
            self._job_index += len(jobs)
        return [outcome_of_return(job, ret) for job, ret in zip(jobs, returns, strict=True)]

    def _report(self, job: Job, result: str) -> None:
        where = self._store.relative(job.run_dir)
        self._store.log(f"{where}: {result}")
        _say(f"{where}: {result}")

    def _stop_if_asked(self) -> None:
        signum = received_signal()
        if signum is not None:
            raise ComparisonStopped(f"{signal.Signals(signum).name} received", signum)

    def _settle(self, outcomes: list[tuple[Job, Outcome]]) -> None:
        """Stop after a batch in which some run did not finish (its cause named)."""
        self._stop_if_asked()
        cut = [(job, o) for job, o in outcomes if o.status not in FINISHED_STATUSES]
        if cut:
            where = ", ".join(self._store.relative(job.run_dir) for job, _ in cut)
            raise ComparisonStopped(
                f"{len(cut)} run(s) did not finish ({where}): {cut[0][1].error}"
            )

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

    def _recover(self, studies: dict[StudyKey, optuna.Study]) -> list[Job]:
        """Trials a killed comparison launched but never recorded (state RUNNING in its study)."""
        pending: list[Job] = []
        for (arm, r), study in studies.items():
            for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                proposal = proposal_of(frozen)
                if proposal is None:
                    self._abandon(study, frozen)
                    continue
                run_dir = self.dir / str(proposal["run_dir"])
                job = Job("tune", arm, r, run_dir, int(proposal["seed"]), dict(proposal["params"]),
                          trial_number=frozen.number, trial_id=frozen._trial_id)  # fmt: skip
                summary = read_summary_data(run_dir)
                if is_finished(summary):
                    self._store.log(
                        f"{self._store.relative(run_dir)} had finished: recorded as it stands"
                    )
                    self._tell(study, job, outcome_of_summary(summary))
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
            f"study {study.study_name}: trial {frozen.number} was cut off while it was proposed "
            "(it never ran); it takes no place in the budget"
        )

    def _guided(self, study: optuna.Study) -> bool:
        """Whether TPE will choose the next trial from results (else it draws at random): TPE
        models once it knows ``tpe_startup_trials`` trials, counting (with its constant liar)
        the running ones."""
        if self._spec.sampler != "tpe":
            return False
        known = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        counted = study.get_trials(deepcopy=False, states=known)
        return len([t for t in counted if not t.user_attrs.get(ABANDONED)]) >= (
            self._spec.tpe_startup_trials
        )

    def _ask(self, study: optuna.Study, arm: str, replicate: int) -> Job:
        number = len(study.get_trials(deepcopy=False))
        study.sampler = self._sampler(replicate, number)
        guided = self._guided(study)
        trial = study.ask({key: self._spec.space[key] for key in self._spec.arms[arm].keys})
        run_dir = self.dir / tune_dir(arm, replicate, trial.number, self._spec.replicates)
        seed = self._spec.tune_seed(replicate, trial.number)
        # one write: a resume finds the whole proposal or none (then the trial never ran)
        proposal = {
            "run_dir": self._store.relative(run_dir),
            "seed": seed,
            "arm": arm,
            "replicate": replicate,
            "params": dict(trial.params),
            "guided": guided,
        }
        trial.set_user_attr(PROPOSAL, proposal)
        return Job("tune", arm, replicate, run_dir, seed, dict(trial.params),
                   trial_number=trial.number, trial_id=trial._trial_id)  # fmt: skip

    @staticmethod
    def _used(study: optuna.Study) -> int:
        """The trials that take a place in the budget (all but abandoned proposals)."""
        return sum(not t.user_attrs.get(ABANDONED) for t in study.get_trials(deepcopy=False))

    def _tune(self, studies: dict[StudyKey, optuna.Study]) -> None:
        trials = self._spec.trials
        order = list(studies)  # replicates outermost, arms interleaved within each
        self._stop_if_asked()
        pending = self._recover(studies)
        if pending:
            # the rest of the batch the kill cut off, alone: the uninterrupted comparison asked
            # its next batch only once this one was told, so TPE sees what it would have seen
            _say(f"{len(pending)} trial(s) were cut off by the kill and continue now")
            self._run_batch(studies, pending)
        batch_size = self._store.batch_size
        while True:
            self._stop_if_asked()
            batch: list[Job] = []
            used = {key: self._used(study) for key, study in studies.items()}
            while len(batch) < batch_size:
                open_keys = [key for key in order if used[key] < trials]
                if not open_keys:
                    break
                # interleaved: a slow period of the machine, or a kill, hits every arm alike
                key = min(open_keys, key=lambda k: (used[k], order.index(k)))
                batch.append(self._ask(studies[key], *key))
                used[key] += 1
            if not batch:
                break
            self._run_batch(studies, batch)

    def _run_batch(self, studies: dict[StudyKey, optuna.Study], batch: list[Job]) -> None:
        """Launch a batch of trials together, tell their results, stop if some did not finish."""
        outcomes = list(zip(batch, self._launch(batch), strict=True))
        for job, outcome in outcomes:
            self._tell(studies[(job.arm, job.replicate)], job, outcome)
        self._settle(outcomes)

    # ------------------------------------------------------------------ final runs
    @staticmethod
    def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
        """The completed trial with the highest objective; the earliest of equals."""
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        return max(done, key=lambda t: (t.value, -t.number))

    def _final(self, studies: dict[StudyKey, optuna.Study]) -> dict[str, list[str]]:
        jobs: list[Job] = []
        finals: dict[str, list[str]] = {}
        spec = self._spec
        for (arm, r), study in studies.items():
            best = self.best_trial(study)
            if best is None:
                _say(f"study {study.study_name}: no trial completed, so it has no final runs")
                self._store.log(f"study {study.study_name}: no completed trial; no final runs")
                continue
            for seed in spec.final_seeds_of(r):
                run_dir = self.dir / final_dir(arm, r, seed, spec.replicates)
                finals.setdefault(arm, []).append(self._store.relative(run_dir))
                if is_finished(read_summary_data(run_dir)):
                    continue
                jobs.append(Job("final", arm, r, run_dir, seed, dict(best.params),
                                resume=last_checkpoint(run_dir).is_file()))  # fmt: skip
        # seed-major: an early stop leaves every arm with the same seeds
        jobs.sort(key=lambda job: (job.seed, list(spec.arms).index(job.arm)))
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
