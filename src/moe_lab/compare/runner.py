"""The equal-budget comparison: one Optuna study per arm, trials run as jobs on Hydra's launcher.

:class:`Comparison` is what the ``compare`` sweeper runs. In order:

1. **Checks, before any training**: the arms, the budget (``compare.trials >= 1``,
   ``compare.seeds >= 2``), the search space (every key must exist in some arm's config), a held-out
   validation split (``data.val_split > 0``), every arm's config composed and validated, and a
   ``resume=`` dir that really is a comparison started with the same settings.
2. **Tuning**: per arm an Optuna study in ``study.db`` (SQLite) inside the comparison dir. Batches
   of trials (arms interleaved) go to the launcher together; trial ``i`` of every arm trains with
   seed ``i`` and ``test=false`` (its data module never loads the test split) in
   ``tune/<arm>/trial_<i>``. Its objective is the run's best validation accuracy. A failed or
   diverged run is told to Optuna as FAIL: it uses up its trial and is never retried.
3. **Final runs**: each arm's best trial (highest objective, the earliest on ties) re-run with
   ``compare.seeds`` seeds ``final_seed_base + j`` (never a tuning seed) in
   ``final/<arm>/seed_<s>``, each scoring the test set once.
4. The report is written by :class:`moe_lab.compare.report.CompareReportCallback` when the
   multirun ends.

**Resume** (``resume=<comparison dir>``, with the original command's overrides): finished trials
and final runs are not run again. A trial the killed process had launched but not recorded is
settled from its run dir: a ``summary.json`` with an outcome is told as it stands; otherwise the
run continues from its ``checkpoints/last.ckpt`` (same trial number, same hyperparameters, same
seed: never counted twice), or starts over in the same dir when it had no checkpoint yet (its
leftovers are moved to ``.killed/``). Final runs are settled the same way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from moe_lab.analysis.compare_report import MARKER, SESSIONS, STUDY_DB
from moe_lab.config import ConfigError, validate_train_config
from moe_lab.utils.io import atomic_write_json, atomic_write_text

from .space import distribution_from_override, flatten_space, format_override, parse_space

__all__ = [
    "FINISHED_STATUSES",
    "JOBS_LOCK",
    "MARKER",
    "STUDY_DB",
    "Comparison",
    "hold_job_lock",
    "read_marker",
]

MARKER_KIND = "moe_lab.compare"
#: Run outcomes that settle a run: it is never launched again.
FINISHED_STATUSES = ("completed", "failed", "diverged")
_PREFIX = "[moe_lab compare]"
#: Held (shared) by every running job of a comparison; see Comparison._take_lock.
JOBS_LOCK = ".jobs.lock"
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")

# Keys the comparison sets itself for every job; a user override of them would break the design.
_RESERVED = {
    "model": "the arms choose the model: use compare.arms=[...] (and compare.arm_overrides)",
    "seed": "the comparison sets the seeds (trial i uses seed i; final runs use "
    "compare.final_seed_base + j)",
    "stage": "the comparison sets stage=tune|final",
    "arm": "the comparison sets arm=<arm name>",
    "test": "the comparison sets test=false for trials and test=true for final runs",
    "trial": "the comparison numbers the trials",
}
# Settings that may differ on resume: they change where and how the comparison runs or how it is
# reported, not what it computes.
_RESUME_FREE_PREFIXES = (
    "compare.baseline",
    "compare.batch_size",
    "compare.dir",
    "resume",
    "paths.",
    "logger",
    "hydra.",
)


def read_marker(comparison_dir: str | Path) -> dict[str, Any]:
    """The settings recorded in ``comparison.json``; ConfigError if the dir is not a comparison."""
    path = Path(comparison_dir).expanduser()
    hint = "pass the dir a comparison printed, e.g. outputs/compare/<experiment>/<time>_<id>"
    if not path.is_dir():
        raise ConfigError(f"resume={comparison_dir}: no such directory; {hint}")
    marker = path / MARKER
    if not marker.is_file():
        raise ConfigError(
            f"resume={comparison_dir} is not a comparison dir (it has no {MARKER}); {hint}. "
            "(To continue a single killed run, use python -m moe_lab.train resume=RUN_DIR.)"
        )
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"resume={comparison_dir}: {marker} is unreadable ({err})") from None
    if not isinstance(record, dict) or record.get("kind") != MARKER_KIND:
        raise ConfigError(f"resume={comparison_dir}: {marker} is not a moe_lab comparison record")
    if not (path / STUDY_DB).is_file():
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


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _say(message: str) -> None:
    print(f"{_PREFIX} {message}", flush=True)


@dataclass
class Arm:
    name: str
    overrides: list[str]
    #: the search-space keys that exist in this arm's config
    keys: list[str] = field(default_factory=list)


@dataclass
class Job:
    stage: str  # "tune" | "final"
    arm: str
    run_dir: Path
    seed: int
    params: dict[str, Any]
    trial_number: int | None = None
    trial_id: int | None = None
    resume: bool = False  # continue from run_dir/checkpoints/last.ckpt


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
        self.dir: Path = Path()
        self.arms: dict[str, Arm] = {}
        self.base_args: list[str] = []
        self.space: dict[str, BaseDistribution] = {}
        self.space_text: dict[str, str] = {}
        self.settings: dict[str, Any] = {}
        self._job_index = 0
        self._lock: Any = None

    # ------------------------------------------------------------------ entry point
    def run(self) -> dict[str, Any]:
        """Check everything, then tune, then run the final seeds. Exits with status 2 and one
        line on stderr for bad input (nothing is trained then)."""
        try:
            resume = self._check()
            self._open_dir(resume)
        except ConfigError as err:
            print(f"moe_lab.compare: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        started, started_at = time.perf_counter(), dt.datetime.now().isoformat(timespec="seconds")
        studies = self._studies()
        self._tune(studies)
        finals = self._final(studies)
        wall = time.perf_counter() - started
        # one line per session (a resumed comparison has several): the report sums them
        with open(self.dir / SESSIONS, "a", encoding="utf-8") as handle:
            session = {
                "started": started_at,
                "wall_time_s": round(wall, 1),
                "resumed": resume is not None,
            }
            handle.write(json.dumps(session) + "\n")
        _say(f"done in {wall:.1f} s; comparison dir: {self.dir}")
        return {"dir": str(self.dir), "final_runs": finals}

    # ------------------------------------------------------------------ checks
    def _compare_cfg(self) -> DictConfig:
        node = self.config.get("compare")
        if not isinstance(node, DictConfig):
            raise ConfigError("the config has no compare: block (run python -m moe_lab.compare)")
        return node

    def _check(self) -> Path | None:
        cmp = self._compare_cfg()
        resume, cli_space = self._split_arguments()

        trials, seeds = cmp.get("trials"), cmp.get("seeds")
        if not _is_int(trials) or trials < 1:
            raise ConfigError(f"compare.trials={trials!r} is invalid: expected an integer >= 1")
        if not _is_int(seeds) or seeds < 2:
            raise ConfigError(
                f"compare.seeds={seeds!r} is invalid: expected an integer >= 2 (the standard "
                "error of the final test accuracy needs at least two seeds)"
            )
        base = cmp.get("final_seed_base")
        if not _is_int(base) or base < trials:
            raise ConfigError(
                f"compare.final_seed_base={base!r} is invalid: expected an integer >= "
                f"compare.trials ({trials}), so that no final seed is a tuning seed (trial i "
                "trains with seed i)"
            )
        sampler = cmp.get("sampler")
        if sampler not in ("tpe", "random"):
            raise ConfigError(f"compare.sampler={sampler!r} is invalid: expected tpe or random")
        if not _is_int(cmp.get("sampler_seed")) or cmp.sampler_seed < 0:
            raise ConfigError(
                f"compare.sampler_seed={cmp.get('sampler_seed')!r}: expected an int >= 0"
            )
        startup = cmp.get("tpe_startup_trials")
        if not _is_int(startup) or startup < 1:
            raise ConfigError(
                f"compare.tpe_startup_trials={startup!r} is invalid: expected an integer >= 1"
            )
        batch = cmp.get("batch_size")
        if batch is not None and (not _is_int(batch) or batch < 1):
            raise ConfigError(f"compare.batch_size={batch!r}: expected null or an integer >= 1")

        arm_names = self._arm_names(cmp)
        self.arms = {name: Arm(name, self._arm_overrides(cmp, name)) for name in arm_names}
        baseline = cmp.get("baseline")
        if baseline is not None and baseline not in self.arms:
            raise ConfigError(f"compare.baseline={baseline!r} is not one of the arms {arm_names}")

        flat = flatten_space(self.config.get("hparams_search") or {})
        self.space, self.space_text = parse_space({**flat, **cli_space})
        self._check_arm_configs()

        self.settings = {
            "arms": {name: arm.overrides for name, arm in self.arms.items()},
            "arm_keys": {name: arm.keys for name, arm in self.arms.items()},
            "trials": trials,
            "seeds": seeds,
            "final_seeds": [base + j for j in range(seeds)],
            "tune_seeds": list(range(trials)),
            "space": self.space_text,
            "sampler": sampler,
            "sampler_seed": cmp.sampler_seed,
            "tpe_startup_trials": startup,
            "max_epochs": OmegaConf.select(self.config, "trainer.max_epochs"),
            "overrides": sorted(
                a for a in self.base_args if not a.lstrip("+~").startswith(_RESUME_FREE_PREFIXES)
            ),
        }
        return resume

    def _split_arguments(self) -> tuple[Path | None, dict[str, str]]:
        """Sort the command line into the jobs' overrides, search ranges and ``resume``."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        resume: Path | None = None
        cli_space: dict[str, str] = {}
        for override in parser.parse_overrides(self.arguments):
            key = override.key_or_group
            if key in _RESERVED:
                raise ConfigError(f"{override.input_line}: {_RESERVED[key]}")
            if override.is_sweep_override():
                space_key = key.removeprefix("hparams_search.")
                distribution_from_override(override)  # a clear error for a bad range, now
                cli_space[space_key] = override.get_value_string()
                continue
            if key == "resume":
                value = override.value()
                resume = None if value in (None, "") else Path(str(value)).expanduser().resolve()
                continue
            self.base_args.append(override.input_line)
        return resume, cli_space

    def _arm_names(self, cmp: DictConfig) -> list[str]:
        arms = cmp.get("arms")
        if arms is None:
            grid = self.grid_params.get("model")
            if grid is None:
                raise ConfigError(
                    "no arms: set compare.arms=[cnn,moe,cnn_matched] (or pick an experiment "
                    "preset whose sweep lists models)"
                )
            arms = [part.strip() for part in str(grid).split(",")]
        elif isinstance(arms, str):
            arms = [part.strip() for part in arms.split(",")]
        elif isinstance(arms, ListConfig | list):
            arms = [str(a) for a in arms]
        else:
            raise ConfigError(f"compare.arms={arms!r} is invalid: expected a list of arm names")
        if len(arms) == 0 or any(not a for a in arms):
            raise ConfigError(f"compare.arms={arms} is invalid: expected at least one arm name")
        duplicates = sorted({a for a in arms if arms.count(a) > 1})
        if duplicates:
            raise ConfigError(f"compare.arms lists {duplicates} more than once")
        for name in arms:
            if not _ARM_NAME.match(name) or name in (".", ".."):
                raise ConfigError(
                    f"arm name {name!r} is invalid: use letters, digits and _ . + - (it names "
                    "the arm's folders)"
                )
        return arms

    def _arm_overrides(self, cmp: DictConfig, name: str) -> list[str]:
        defined = cmp.get("arm_overrides") or {}
        if name in defined:
            overrides = defined[name]
            if isinstance(overrides, str):
                overrides = [overrides]
            if not isinstance(overrides, ListConfig | list) or not all(
                isinstance(o, str) for o in overrides
            ):
                raise ConfigError(
                    f"compare.arm_overrides.{name}={_plain(overrides)!r}: expected a list of "
                    "overrides such as [model=moe, experts=k4]"
                )
            overrides = list(overrides)
            if not any(o.startswith("model=") for o in overrides):
                overrides.insert(0, f"model={name}")
            return overrides
        models = self.hydra_context.config_loader.get_group_options("model")
        if name not in models:
            raise ConfigError(
                f"unknown arm {name!r}: it is neither a model config ({', '.join(models)}) nor "
                "defined in compare.arm_overrides"
            )
        return [f"model={name}"]

    def _compose(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    def _check_arm_configs(self) -> None:
        missing = object()
        keys_in_some_arm: set[str] = set()
        for arm in self.arms.values():
            try:
                cfg = self._compose([*self.base_args, *arm.overrides])
            except Exception as err:
                raise ConfigError(
                    f"arm {arm.name!r} ({' '.join(arm.overrides)}): its config does not compose: "
                    f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                ) from None
            for key in self.space:
                value = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
                if value is missing:
                    continue
                if OmegaConf.is_config(OmegaConf.select(cfg, key)):
                    raise ConfigError(
                        f"search-space key {key} is a config section in arm {arm.name!r}, not "
                        "one value; search its values (e.g. {key}.<name>) instead"
                    )
                arm.keys.append(key)
                keys_in_some_arm.add(key)
            val_split = OmegaConf.select(cfg, "data.val_split")
            if not isinstance(val_split, int | float) or isinstance(val_split, bool):
                raise ConfigError(f"data.val_split={val_split!r}: expected a fraction in (0, 1)")
            if val_split <= 0:
                raise ConfigError(
                    f"data.val_split={val_split} is refused: with no held-out validation split "
                    "the test set would be the validation set, and tuning would see it. Set "
                    "data.val_split=0.1 (a fraction of the training set)"
                )
            # Every value at the lower end of its range: the trial configs then compose too.
            probe = self._compose(
                [
                    *self.base_args,
                    *arm.overrides,
                    *(format_override(k, self._probe_value(k)) for k in arm.keys),
                    "seed=0",
                ]
            )
            try:
                validate_train_config(probe)
            except ConfigError as err:
                raise ConfigError(f"arm {arm.name!r}: {err}") from None
        unknown = [key for key in self.space if key not in keys_in_some_arm]
        if unknown:
            raise ConfigError(
                f"unknown search-space key(s) {unknown}: no arm's config has them (keys are "
                "dotted config paths such as optimizer.lr)"
            )

    def _probe_value(self, key: str) -> Any:
        dist = self.space[key]
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return dist.choices[0]
        return dist.low  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ the comparison dir
    def _open_dir(self, resume: Path | None) -> None:
        if resume is not None:
            record = read_marker(resume)
            differing = [
                key
                for key, value in self.settings.items()
                if json.loads(json.dumps(value)) != record.get("settings", {}).get(key)
            ]
            if differing:
                saved = record.get("settings", {})
                details = "; ".join(
                    f"{key}: started with {saved.get(key)!r}, now {self.settings[key]!r}"
                    for key in differing
                )
                raise ConfigError(
                    f"resume={resume}: the comparison was started with different settings "
                    f"({details}). Repeat the original command with resume= added: "
                    f"{record.get('command', '')}"
                )
            self.dir = resume
        else:
            self.dir = Path(str(OmegaConf.select(self.config, "compare.dir"))).expanduser()
            self.dir = self.dir.resolve()
            if (self.dir / MARKER).exists():
                raise ConfigError(f"{self.dir} already holds a comparison; resume it with resume=")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        # The launchers create, and the report callback reads, hydra.sweep.dir.
        with read_write(self.config), open_dict(self.config):
            self.config.hydra.sweep.dir = str(self.dir)
        if resume is None:
            record = {
                "kind": MARKER_KIND,
                "version": 1,
                "experiment": self.config.get("experiment_name"),
                "created": dt.datetime.now().isoformat(timespec="seconds"),
                "command": "python -m moe_lab.compare " + " ".join(self.arguments),
                "baseline": self._compare_cfg().get("baseline"),
                "settings": json.loads(json.dumps(self.settings)),
            }
            atomic_write_json(self.dir / MARKER, record)
            atomic_write_text(self.dir / "multirun.yaml", OmegaConf.to_yaml(self.config))
            _say(f"new comparison in {self.dir}")
        else:
            _say(f"resuming the comparison in {self.dir}")
        self._log(
            f"{'resume' if resume else 'start'}: arms {list(self.arms)}, "
            f"{self.settings['trials']} trials, {self.settings['seeds']} final seeds"
        )

    def _take_lock(self) -> None:
        """One comparison process per dir, and none while jobs of a killed one still run.

        The comparison holds ``.compare.lock`` exclusively; every job holds ``JOBS_LOCK`` shared
        while it runs (:func:`hold_job_lock`). Killing only the comparison's process leaves its
        parallel workers running their jobs (joblib's workers outlive it); resuming then would
        run the same trial twice in one dir, so it is refused until they have ended.
        """
        handle = open(self.dir / ".compare.lock", "a+")  # noqa: SIM115  (held until exit)
        busy = None
        if not _try_exclusive_lock(handle):
            busy = (
                f"{self.dir} is in use by another running comparison; wait for it to end, or "
                "stop it, before resuming"
            )
        else:
            with open(self.dir / JOBS_LOCK, "a+") as jobs:
                if not _try_exclusive_lock(jobs):
                    busy = (
                        f"jobs of the stopped comparison in {self.dir} are still running (its "
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
        self._lock = handle

    def _log(self, message: str) -> None:
        with open(self.dir / "comparison.log", "a", encoding="utf-8") as handle:
            handle.write(f"{dt.datetime.now().isoformat(timespec='seconds')} {message}\n")

    # ------------------------------------------------------------------ studies
    def _storage(self) -> str:
        return f"sqlite:///{self.dir / STUDY_DB}"

    def _studies(self) -> dict[str, optuna.Study]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return {
            name: optuna.create_study(
                storage=self._storage(),
                study_name=name,
                direction="maximize",
                load_if_exists=True,
            )
            for name in self.arms
        }

    def _sampler(self, trial_number: int) -> optuna.samplers.BaseSampler:
        # One seed per trial number, the same for every arm: the arms' random trials are paired,
        # and a resumed comparison proposes what the uninterrupted one would have proposed
        # from the same finished trials.
        cmp = self._compare_cfg()
        seed = int(np.random.SeedSequence([cmp.sampler_seed, trial_number]).generate_state(1)[0])
        if cmp.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=cmp.tpe_startup_trials,
                # trials asked while others run get a pessimistic stand-in value
                constant_liar=True,
            )

    def _batch_size(self) -> int:
        configured = self._compare_cfg().get("batch_size")
        if configured is not None:
            return int(configured)
        workers = OmegaConf.select(self.config, "hydra.launcher.n_jobs", default=None)
        if _is_int(workers) and workers < 0:  # joblib: -1 = all cores
            workers = max(1, (os.cpu_count() or 1) + 1 + workers)
        workers = workers if _is_int(workers) and workers > 0 else 1
        # one trial per arm per worker: with arms of unequal speed (cnn_matched takes ~2.5x the
        # cnn's time) a batch of one trial per arm leaves a worker idle while the slowest runs;
        # two per arm on two workers pack them, and TPE still learns every two trials per arm
        return workers * len(self.arms)

    # ------------------------------------------------------------------ running jobs
    def _relative(self, path: Path) -> str:
        return path.relative_to(self.dir).as_posix()

    def _job_overrides(self, job: Job) -> list[str]:
        arm = self.arms[job.arm]
        return [
            *self.base_args,
            *arm.overrides,
            *(format_override(k, v) for k, v in job.params.items()),
            f"seed={job.seed}",
            f"stage={job.stage}",
            f"arm={job.arm}",
            format_override("trial", job.trial_number if job.stage == "tune" else None),
            f"test={'true' if job.stage == 'final' else 'false'}",
            format_override("resume", str(job.run_dir) if job.resume else None),
            format_override("hydra.sweep.dir", str(self.dir)),
            format_override("hydra.sweep.subdir", self._relative(job.run_dir)),
        ]

    def _set_aside(self, run_dir: Path) -> None:
        """Move a killed run's leftovers out of the way before it starts over (kept, not lost)."""
        if not run_dir.exists() or not any(run_dir.iterdir()):
            return
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        target = run_dir.parent / ".killed" / f"{run_dir.name}_{stamp}_{os.getpid()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir), str(target))
        self._log(f"set aside the leftovers of {self._relative(run_dir)} in {target}")

    def _launch(self, jobs: list[Job]) -> list[Outcome]:
        for job in jobs:
            if not job.resume:
                self._set_aside(job.run_dir)
            what = "resumes from its checkpoint" if job.resume else "starts"
            self._log(f"{self._relative(job.run_dir)} {what} (seed {job.seed}, {job.params})")
        _say(
            "launching "
            + ", ".join(
                self._relative(j.run_dir) + (" (resumed)" if j.resume else "") for j in jobs
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
        summary = summary or _read_summary(job.run_dir)
        return self._outcome_of_summary(summary, error)

    @staticmethod
    def _outcome_of_summary(summary: dict[str, Any] | None, error: str | None = None) -> Outcome:
        if summary is None:
            return Outcome("failed", None, None, error or "the job wrote no summary.json")
        status = summary.get("status")
        value = summary.get("val_acc_best")
        if status == "completed":
            if isinstance(value, int | float) and math.isfinite(value):
                return Outcome("completed", float(value), summary)
            return Outcome("failed", None, summary, "completed without a validation accuracy")
        message = summary.get("error_message") or error
        return Outcome(str(status), None, summary, message)

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
        where = self._relative(job.run_dir)
        result = (
            f"val acc {outcome.value:.4f}"
            if outcome.value is not None
            else f"{outcome.status}: {outcome.error}"
        )
        self._log(f"{where}: {result}")
        _say(f"{where}: {result}")

    def _recover(self, studies: dict[str, optuna.Study]) -> list[Job]:
        """Trials a killed comparison launched but never recorded (state RUNNING in study.db)."""
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
                summary = _read_summary(run_dir)
                if summary is not None and summary.get("status") in FINISHED_STATUSES:
                    self._log(f"{self._relative(run_dir)} had finished: recorded as it stands")
                    self._tell(study, job, self._outcome_of_summary(summary))
                    continue
                job.resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
                pending.append(job)
        return pending

    def _ask(self, study: optuna.Study, arm: Arm) -> Job:
        number = len(study.get_trials(deepcopy=False))
        study.sampler = self._sampler(number)
        trial = study.ask({key: self.space[key] for key in arm.keys})
        run_dir = self.dir / "tune" / arm.name / f"trial_{trial.number:03d}"
        trial.set_user_attr("run_dir", self._relative(run_dir))
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
        trials = self.settings["trials"]
        pending = self._recover(studies)
        if pending:
            _say(f"{len(pending)} trial(s) were cut off by the kill and continue now")
        batch_size = self._batch_size()
        while True:
            batch, pending = pending[:batch_size], pending[batch_size:]
            used = {name: len(study.get_trials(deepcopy=False)) for name, study in studies.items()}
            while len(batch) < batch_size:
                open_arms = [name for name in self.arms if used[name] < trials]
                if not open_arms:
                    break
                # arms interleaved: a slow period of the machine, or a kill, hits every arm alike
                name = min(open_arms, key=lambda n: (used[n], list(self.arms).index(n)))
                batch.append(self._ask(studies[name], self.arms[name]))
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
        for j, seed in enumerate(self.settings["final_seeds"]):
            for name, study in studies.items():
                best = self.best_trial(study)
                if best is None:
                    if j == 0:
                        _say(f"arm {name}: no trial completed, so it has no final runs")
                        self._log(f"arm {name}: no completed trial; no final runs")
                    continue
                run_dir = self.dir / "final" / name / f"seed_{seed}"
                finals.setdefault(name, []).append(self._relative(run_dir))
                summary = _read_summary(run_dir)
                if summary is not None and summary.get("status") in FINISHED_STATUSES:
                    continue
                jobs.append(
                    Job(
                        stage="final",
                        arm=name,
                        run_dir=run_dir,
                        seed=seed,
                        params=dict(best.params),
                        resume=(run_dir / "checkpoints" / "last.ckpt").is_file(),
                    )
                )
        if jobs:
            for job, outcome in zip(jobs, self._launch(jobs), strict=True):
                where = self._relative(job.run_dir)
                test_acc = (outcome.summary or {}).get("test_acc")
                result = (
                    f"test acc {test_acc:.4f}"
                    if outcome.status == "completed" and isinstance(test_acc, int | float)
                    else f"{outcome.status}: {outcome.error}"
                )
                self._log(f"{where}: {result}")
                _say(f"{where}: {result}")
        return finals
