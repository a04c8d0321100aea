"""The jobs a sweep was meant to run, read back from the ``multirun.yaml`` Hydra leaves in it.

Hydra's basic sweeper (used by the basic, joblib and submitit launchers alike) expands
``hydra.sweeper.params`` followed by the command line's overrides (``hydra.overrides.task``) into
the cartesian product of their values, numbers the jobs in that order, and puts job ``num`` in
``<sweep dir>/<hydra.sweep.subdir>`` (here ``<num>_<override_dirname>``). This module repeats that
expansion with Hydra's own parser and sweeper code, so that a report can list the jobs that never
started and ``python -m moe_lab.finish`` can run them in the dir Hydra would have used.

Override strings are compared through :func:`override_identity`: keys that only say where files
go or how they are logged (``paths.*``, ``hydra.*``, ``logger``, ``resume``) never make two jobs
different, and ``3e-3`` equals ``0.003``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MULTIRUN_FILE = "multirun.yaml"
#: THE list of override keys that never identify a job: where it writes (``paths``, ``hydra``),
#: how it is logged (``logger``), which dir it resumes (a resumed run is the same run), how many
#: threads it uses, and a comparison's own bookkeeping (where it lives, what its report calls the
#: baseline, how many jobs go to the launcher at once). A key counts when it is one of these or
#: lies below one (``logger.wandb.project``, ``hydra/launcher``). The sweep plan, the run labels,
#: the report's groups and a comparison's resume check all read it from here.
NOT_IDENTIFYING_KEYS: tuple[str, ...] = (
    "resume",
    "logger",
    "num_threads",
    "paths",
    "hydra",
    "compare.baseline",
    "compare.batch_size",
    "compare.dir",
)
_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
_JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def override_key(item: str) -> str:
    """``"+trainer.limit_train_batches=2"`` -> ``"trainer.limit_train_batches"``."""
    return item.partition("=")[0].strip().lstrip("+~")


def is_bookkeeping(key: str) -> bool:
    """True for a key of :data:`NOT_IDENTIFYING_KEYS` or one below it (``+``/``~`` ignored)."""
    key = key.lstrip("+~")
    return any(
        key == root or key.startswith((f"{root}.", f"{root}/")) for root in NOT_IDENTIFYING_KEYS
    )


def normalize_value(value: str) -> str:
    """One spelling per value: ``3e-3`` and ``0.003`` -> ``0.003``; ``True`` -> ``true``."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text.lower() if text.lower() in ("true", "false", "null") else text
    return str(int(number)) if number.is_integer() and "e" not in text.lower() else repr(number)


def parse_overrides(items: Iterable[str] | None) -> dict[str, str]:
    """``{key: normalized value}`` of the overrides that define a job (bookkeeping keys dropped;
    a deletion ``~key`` maps to ``"<deleted>"``)."""
    parsed: dict[str, str] = {}
    for item in items or ():
        item = str(item)
        key = override_key(item)
        if not key or is_bookkeeping(key):
            continue
        _, sep, value = item.partition("=")
        parsed[key] = normalize_value(value) if sep else "<deleted>"
    return parsed


def override_identity(items: Iterable[str] | None) -> frozenset[tuple[str, str]] | None:
    """What makes two jobs the same (config, seed): their defining overrides, in any order.
    None when there is nothing to compare (no overrides recorded)."""
    items = list(items or ())
    if not items:
        return None
    return frozenset(parse_overrides(items).items())


@dataclass(frozen=True)
class PlannedJob:
    """One job of a sweep as Hydra expanded it."""

    num: int
    overrides: tuple[str, ...]
    #: where Hydra puts (or put) the job: ``<sweep dir>/<subdir>``; None if the subdir rule
    #: cannot be resolved outside Hydra
    run_dir: Path | None

    @property
    def identity(self) -> frozenset[tuple[str, str]] | None:
        return override_identity(self.overrides)


@dataclass
class SweepPlan:
    """What a sweep dir's ``multirun.yaml`` says about the sweep."""

    sweep_dir: Path
    multirun_yaml: Path
    #: the planned jobs; None when the sweeper does not fix them in advance (e.g. Optuna)
    jobs: list[PlannedJob] | None
    #: why ``jobs`` is None
    note: str = ""
    #: jobs the launcher ran at once (joblib's n_jobs; 1 for the basic launcher)
    parallel: int = 1
    #: the dir the multirun was started from (relative paths in overrides refer to it)
    cwd: Path | None = None
    #: ``--config-dir`` dirs and ``hydra.searchpath`` overrides the sweep was composed with
    config_args: list[str] = field(default_factory=list)


def _container(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def _subdir(raw: Any, num: int, dirname: str) -> str | None:
    if raw is None:
        return None
    text = str(raw)
    if text == "${hydra.job.num}_${hydra.job.override_dirname}":
        return f"{num}_{dirname}"
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.create(
            {"hydra": {"job": {"num": num, "override_dirname": dirname}, "subdir": text}}
        )
        return str(OmegaConf.select(node, "hydra.subdir", throw_on_resolution_failure=True))
    except Exception:  # an interpolation only Hydra can resolve: match jobs by overrides alone
        return None


def _overrides_dirname(overrides: list[Any], exclude: list[str], item_sep: str, kv_sep: str) -> str:
    """Hydra's ``hydra.job.override_dirname`` of one job's parsed overrides."""
    try:
        from hydra._internal.config_loader_impl import get_overrides_dirname

        return get_overrides_dirname(
            overrides=overrides, exclude_keys=exclude, item_sep=item_sep, kv_sep=kv_sep
        )
    except ImportError:  # the same rule, should Hydra move the helper
        lines = sorted(o.input_line for o in overrides if o.key_or_group not in exclude)
        return item_sep.join(lines).replace("=", kv_sep)


def read_plan(sweep_dir: str | Path) -> SweepPlan | None:
    """The plan in ``sweep_dir/multirun.yaml``, or None when the dir has no such file.

    Raises:
        ValueError: the file exists but cannot be read or parsed (the message names it).
    """
    sweep = Path(sweep_dir)
    path = sweep / MULTIRUN_FILE
    if not path.is_file():
        return None
    from omegaconf import DictConfig, OmegaConf

    try:
        loaded = OmegaConf.load(path)
        hydra_cfg = _container(loaded.get("hydra")) if isinstance(loaded, DictConfig) else None
        if not isinstance(hydra_cfg, dict):
            raise ValueError("no 'hydra' section")
        overrides = hydra_cfg.get("overrides") or {}
        task = [str(o) for o in overrides.get("task") or []]
        hydra_overrides = [str(o) for o in overrides.get("hydra") or []]
        sweeper = hydra_cfg.get("sweeper") or {}
        launcher = hydra_cfg.get("launcher") or {}
        job_cfg = ((hydra_cfg.get("job") or {}).get("config") or {}).get("override_dirname") or {}
        raw_subdir = (hydra_cfg.get("sweep") or {}).get("subdir")
        runtime = hydra_cfg.get("runtime") or {}
    except Exception as err:
        raise ValueError(f"{path}: not a readable Hydra multirun.yaml ({err})") from err

    plan = SweepPlan(sweep_dir=sweep, multirun_yaml=path, jobs=None)
    cwd = runtime.get("cwd")
    plan.cwd = Path(str(cwd)) if cwd else None
    for source in runtime.get("config_sources") or []:
        if isinstance(source, dict) and source.get("provider") == "command-line":
            plan.config_args.append(f"--config-dir={source.get('path')}")
    plan.config_args += [o for o in hydra_overrides if override_key(o) == "hydra.searchpath"]
    n_jobs = launcher.get("n_jobs") if launcher.get("_target_") == _JOBLIB_LAUNCHER else 1
    plan.parallel = n_jobs if isinstance(n_jobs, int) and n_jobs > 0 else 1

    if sweeper.get("_target_") != _BASIC_SWEEPER:
        plan.note = (
            f"the sweeper {sweeper.get('_target_')!r} chooses its jobs while it runs, so "
            f"{path} does not list them; jobs that never started cannot be named"
        )
        return plan
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + task
    try:
        parser = OverridesParser.create()
        batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
        jobs = []
        for num, job in enumerate(batches[0] if batches else []):
            dirname = _overrides_dirname(
                parser.parse_overrides(job),
                list(job_cfg.get("exclude_keys") or []),
                str(job_cfg.get("item_sep", ",")),
                str(job_cfg.get("kv_sep", "=")),
            )
            subdir = _subdir(raw_subdir, num, dirname)
            jobs.append(
                PlannedJob(
                    num=num, overrides=tuple(job), run_dir=sweep / subdir if subdir else None
                )
            )
    except Exception as err:  # e.g. glob() sweeps, which need the config to expand
        plan.note = f"could not expand the sweep in {path} ({type(err).__name__}: {err})"
        return plan
    plan.jobs = jobs
    return plan


def varying_keys(sweep_dir: Path | None) -> set[str] | None:
    """The override keys that take several values in the sweep (from its ``multirun.yaml``: the
    config's sweeper params first, then the command line's overrides, key by key); None outside a
    sweep or when the sweep's record cannot be read."""
    if sweep_dir is None:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        recorded = OmegaConf.load(sweep_dir / MULTIRUN_FILE).hydra
        overrides = [f"{k}={v}" for k, v in (recorded.sweeper.get("params") or {}).items()]
        overrides += list(recorded.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # no readable record of the sweep: the caller treats it as a single run
        return None
    last = {o.key_or_group: o for o in parsed}
    return {key for key, o in last.items() if o.is_sweep_override()}


__all__ = [
    "MULTIRUN_FILE",
    "NOT_IDENTIFYING_KEYS",
    "PlannedJob",
    "SweepPlan",
    "is_bookkeeping",
    "normalize_value",
    "override_identity",
    "override_key",
    "parse_overrides",
    "read_plan",
    "varying_keys",
]
