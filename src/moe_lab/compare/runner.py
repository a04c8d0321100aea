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
   as FAIL: it uses up its trial and is never retried.
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

import datetime as dt
import math
import os
import sys
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
from moe_lab.run.comparison import JOBS_LOCK, MARKER, STUDY_DB
from moe_lab.run.record import SUMMARY_FILE, last_checkpoint

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

#: Run outcomes that settle a run: it is never launched again.
FINISHED_STATUSES = ("completed", "failed", "diverged")
_PREFIX = "[moe_lab compare]"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _say(message: str) -> None:
    print(f"{_PREFIX} {message}", flush=True)


def _is_finished(summary: dict[str, Any] | None) -> bool:
    return summary is not None and summary.get("status") in FINISHED_STATUSES


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
        studies = self._store.studies(self._spec.arms)
        self._tune(studies)
        finals = self._final(studies)
        wall = time.perf_counter() - started
        self._store.add_session(started_at, wall, resumed=self._spec.resume is not None)
        _say(f"done in {wall:.1f} s; comparison dir: {self.dir}")
        return {"dir": str(self.dir), "final_runs": finals}

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
        returns = self.launcher.launch(
            [self._job_overrides(j) for j in jobs], initial_job_idx=self._job_index
        )
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
        return self._outcome_of_summary(summary, error)

    @staticmethod
    def _outcome_of_summary(summary: dict[str, Any] | None, error: str | None = None) -> Outcome:
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
        assert job.trial_id is not None and job.trial_number is not None
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
                run_dir = self.dir / str(frozen.user_attrs.get("run_dir"))
                job = Job(
                    stage="tune",
                    arm=name,
                    run_dir=run_dir,
                    seed=int(frozen.user_attrs.get("seed", frozen.number)),
                    params=dict(frozen.params),
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

    def _ask(self, study: optuna.Study, arm: Arm) -> Job:
        number = len(study.get_trials(deepcopy=False))
        study.sampler = self._sampler(number)
        trial = study.ask({key: self._spec.space[key] for key in arm.keys})
        run_dir = self.dir / "tune" / arm.name / f"trial_{trial.number:03d}"
        trial.set_user_attr("run_dir", self._store.relative(run_dir))
        trial.set_user_attr("seed", trial.number)
        trial.set_user_attr("arm", arm.name)
        return Job(
            stage="tune",
            arm=arm.name,
            run_dir=run_dir,
            seed=trial.number,
            params=dict(trial.params),
            trial_number=trial.number,
            trial_id=trial._trial_id,
        )

    def _tune(self, studies: dict[str, optuna.Study]) -> None:
        trials, arms = self._spec.trials, self._spec.arms
        pending = self._recover(studies)
        if pending:
            _say(f"{len(pending)} trial(s) were cut off by the kill and continue now")
        batch_size = self._batch_size()
        while True:
            batch, pending = pending[:batch_size], pending[batch_size:]
            used = {name: len(study.get_trials(deepcopy=False)) for name, study in studies.items()}
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
            for job, outcome in zip(batch, self._launch(batch), strict=True):
                self._tell(studies[job.arm], job, outcome)

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
            for job, outcome in zip(jobs, self._launch(jobs), strict=True):
                test_acc = (outcome.summary or {}).get("test_acc")
                self._report(
                    job,
                    f"test acc {test_acc:.4f}"
                    if outcome.status == "completed" and isinstance(test_acc, int | float)
                    else f"{outcome.status}: {outcome.error}",
                )
        return finals
