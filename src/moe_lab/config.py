"""Where the Hydra configs live, and the checks a config passes before any training starts."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

import moe_lab.run.resolvers  # noqa: F401  (registers ${uid:} and friends before Hydra composes)
from moe_lab.run.record import hydra_config_path, last_checkpoint

CONFIG_DIR_ENV = "MOE_LAB_CONFIG_DIR"


def _find_config_dir() -> Path:
    """``$MOE_LAB_CONFIG_DIR`` if set, else the ``conf/`` that travels with the package.

    In a wheel, ``moe_lab/conf`` holds a copy of the repository's top-level ``conf/``; in a
    checkout (editable install) it is a symlink to it. Where the symlink was checked out as a
    plain file (git on Windows without symlinks), the checkout's ``conf/`` is used directly.
    """
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env).expanduser().absolute()
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parents[1] / "conf"):
        with contextlib.suppress(OSError):
            if (candidate / "train.yaml").is_file():
                return candidate.resolve()
    # Defer the error to first use (config_dir_problem), so that `import moe_lab` never fails.
    return package / "conf"


CONFIG_DIR = _find_config_dir()


def config_dir_problem(config_name: str = "train", config_dir: Path | None = None) -> str | None:
    """Why ``config_dir`` (default :data:`CONFIG_DIR`) cannot serve ``<config_name>.yaml``, as one
    line that says what to do, or None when it can."""
    config_dir = CONFIG_DIR if config_dir is None else config_dir
    from_env = os.environ.get(CONFIG_DIR_ENV) and config_dir == CONFIG_DIR
    where = f"{CONFIG_DIR_ENV}={config_dir}" if from_env else f"config dir {config_dir}"
    fix = (
        f"point {CONFIG_DIR_ENV} at a copy of moe_lab's conf/ dir, or unset it to use the "
        "configs installed with moe_lab"
        if from_env
        else f"reinstall moe_lab (its wheel carries conf/), or set {CONFIG_DIR_ENV} to a copy of "
        "the repository's conf/ dir"
    )
    target = config_dir / f"{config_name}.yaml"
    try:
        if not config_dir.is_dir():
            return f"{where} does not exist; {fix}"
        if not target.is_file():
            return f"{where} has no {target.name}; {fix}"
        with target.open("rb"):
            pass
        os.listdir(config_dir)
    except OSError as err:
        return f"{where} is not readable ({err.strerror}); fix its permissions, or {fix}"
    return None


def require_config_dir(config_name: str = "train") -> Path:
    """:data:`CONFIG_DIR`, or exit with a one-line ``error: ...`` before Hydra starts (an entry
    point calls this so that a missing or unreadable config dir never becomes a stack trace)."""
    problem = config_dir_problem(config_name)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return CONFIG_DIR


# conf/hydra/launcher/{basic,joblib,submitit_slurm}.yaml deliberately carry the plugins' names, so
# Hydra matches them against the plugins' schemas and says so on every run.
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema")


class ConfigError(ValueError):
    """A config value that cannot work, found before any training starts."""


def _require(cfg: DictConfig, key: str, check: Any, expected: str) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None or not check(value):
        raise ConfigError(
            f"{key}={value!r} is invalid: expected {expected} (override it, e.g. {key}=...)"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_train_config(cfg: DictConfig) -> None:
    """Check the values that would otherwise fail deep inside torch or Lightning."""
    if not (CONFIG_DIR / "train.yaml").is_file():
        raise ConfigError(f"config dir {CONFIG_DIR} has no train.yaml; set MOE_LAB_CONFIG_DIR")
    _require(cfg, "seed", _is_int, "an integer")
    _require(cfg, "trainer.max_epochs", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _require(cfg, "data.batch_size", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _require(
        cfg,
        "data.val_split",
        lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
        "a fraction in [0, 1)",
    )
    _require(cfg, "experts.n_experts", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _require(
        cfg, "optimizer.lr", lambda v: isinstance(v, (int, float)) and v > 0, "a positive number"
    )
    if cfg.get("num_threads") is not None:
        _require(cfg, "num_threads", lambda v: _is_int(v) and v >= 1, "a positive integer or null")
    _check_temperature_schedule(cfg)
    weights = cfg.experts.get("aux_loss_weights") or {}
    for name, weight in weights.items():
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(
                f"experts.aux_loss_weights.{name}={weight!r} is invalid: expected a number >= 0"
            )


def _check_temperature_schedule(cfg: DictConfig) -> None:
    """``experts.gate_temperature_schedule``: null, or ``{start: > 0, end: > 0, epochs: >= 1}``."""
    key = "experts.gate_temperature_schedule"
    schedule = OmegaConf.select(cfg, key, default=None)
    if schedule is None:
        return
    if not OmegaConf.is_dict(schedule) or set(schedule) != {"start", "end", "epochs"}:
        raise ConfigError(
            f"{key}={_plain(schedule)!r} is invalid: expected null or a mapping "
            f"{{start: tau0, end: tau1, epochs: N}} (e.g. {key}={{start:30,end:1,epochs:10}})"
        )
    for name in ("start", "end"):
        _require(
            cfg,
            f"{key}.{name}",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
            "a finite number > 0",
        )
    _require(cfg, f"{key}.epochs", lambda v: _is_int(v) and v >= 1, "a positive integer")


class ResumeRefused(ConfigError):
    """``resume=`` cannot continue the run it names; the run dir was left as it was."""


def _resolved(node: Any) -> Any:
    """A config node as plain values, interpolations resolved (within its own config), so that
    ``T_max: ${trainer.max_epochs}`` compares as the number it stands for."""
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside the run that wrote it: compare as written
        return OmegaConf.to_container(node, resolve=False)


# Parts of the config that define what a run computes: a resumed run must keep them.
RESUME_KEYS = ("data", "model", "experts", "activation", "optimizer", "scheduler", "seed")
# ...except where things live: a moved data dir is the same data
_RESUME_IGNORED = {("data", "data_dir")}
# Keys the configs gained after runs were recorded without them: a record that lacks one compares
# equal to the value that computes what the run computed (None: any value, for
# experts.gating_activation, whose effective value model.gating_activation holds and is compared)
_ADDED_KEYS: dict[str, Any] = {
    "data.topology.batch_norm": False,
    "experts.activation_placement": "before_mix",
    "experts.variance_preserving_init": False,
    "experts.gate_temperature_schedule": None,
    "experts.gating_activation": None,
    "model.activation_placement": "before_mix",
    "model.variance_preserving_init": False,
}


def _differences(original: Any, current: Any, prefix: str) -> list[str]:
    """Dotted keys under ``prefix`` whose values differ, as ``key: old -> new``."""
    if isinstance(original, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(original) | set(current), key=str):
            if (prefix, key) in _RESUME_IGNORED:
                continue
            added = _ADDED_KEYS.get(f"{prefix}.{key}", ...)
            if key not in original and added is not ... and added in (None, current.get(key)):
                continue
            out += _differences(original.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if original == current else [f"{prefix}: {_short(original)} -> {_short(current)}"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_checkpoint_or_refuse(ckpt: Path, resume: Any) -> dict[str, Any]:
    import torch

    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ResumeRefused(
            f"resume={resume}: {ckpt} is unreadable ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'truncated or corrupt'}); the run dir is "
            "left as it was. Restore the file from a copy, or start the run again without resume="
        ) from None


def check_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from, or None for a fresh run.

    ``resume=RUN_DIR`` continues a killed run in place: same dir, same CSV history, from
    ``checkpoints/last.ckpt``. The run's recorded config (``.hydra/config.yaml``) must match the
    current one, values resolved, in the keys that define the experiment; a learning-rate
    schedule planned over ``trainer.max_epochs`` (cosine's ``T_max``) therefore refuses a
    different ``max_epochs``. The checkpoint must load. Raises :class:`ResumeRefused` (before
    anything is written) otherwise.
    """
    resume = cfg.get("resume")
    if not resume:
        return None
    resume_dir = Path(str(resume)).expanduser().resolve()
    if not resume_dir.is_dir():
        raise ResumeRefused(
            f"resume={resume}: no such run dir; pass the output dir of the run to continue"
        )
    ckpt = last_checkpoint(resume_dir)
    if not ckpt.is_file():
        raise ResumeRefused(
            f"resume={resume}: {ckpt} does not exist (the run stopped before its first checkpoint); "
            "start it again without resume="
        )
    original_path = hydra_config_path(resume_dir)
    if original_path.is_file():
        original = OmegaConf.load(original_path)
        differing: list[str] = []
        for key in RESUME_KEYS:
            differing += _differences(_resolved(original.get(key)), _resolved(cfg.get(key)), key)
        if differing:
            old_epochs = OmegaConf.select(original, "trainer.max_epochs", default=None)
            new_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
            planned = "trainer.max_epochs" in str(_plain(original.get("scheduler")))
            if planned and old_epochs != new_epochs:
                raise ResumeRefused(
                    f"resume={resume}: the learning-rate schedule was planned over "
                    f"trainer.max_epochs={old_epochs} ({'; '.join(differing)}), and a resumed run "
                    f"cannot re-plan it without changing the epochs already trained. Resume with "
                    f"trainer.max_epochs={old_epochs}, or start a new run with "
                    f"trainer.max_epochs={new_epochs}"
                )
            raise ResumeRefused(
                f"resume={resume}: the run was started with different "
                f"{', '.join(sorted({d.split(':')[0].split('.')[0] for d in differing}))} "
                f"({'; '.join(differing[:5])}{' ...' if len(differing) > 5 else ''}); "
                "repeat the original command's overrides together with resume="
            )
    _load_checkpoint_or_refuse(ckpt, resume)
    return str(ckpt)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def compose_config(
    overrides: list[str] | None = None,
    config_name: str = "train",
    output_dir: str | os.PathLike[str] | None = None,
) -> DictConfig:
    """The config a command-line run with these overrides would get, composed through Hydra's
    compose API outside any Hydra app (benchmark, notebooks, tests, the comparison driver).

    ``${hydra:...}`` interpolations resolve as in a real run: the composed Hydra node is
    installed as the current :class:`HydraConfig`, with ``output_dir`` (default: a fresh dir
    under ``paths.log_dir``/composed) as the run's output dir.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    problem = config_dir_problem(config_name)
    if problem is not None:
        raise ConfigError(problem)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides or []), return_hydra_config=True)
    if output_dir is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        output_dir = (
            Path(cfg.paths.log_dir) / "composed" / f"{stamp}_{os.getpid():x}{secrets.token_hex(2)}"
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.name = config_name
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
