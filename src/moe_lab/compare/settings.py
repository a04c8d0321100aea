"""A comparison's settings: checked once, before any training, then frozen.

:meth:`CompareSettings.from_config` reads the composed ``compare`` config and the command line,
refuses what cannot work (the arms, the budget, the search space, every arm's config composed and
validated, a held-out validation split) and returns one frozen :class:`CompareSettings`.
:meth:`CompareSettings.to_record` is the ``settings`` of the comparison dir's record
(:class:`~moe_lab.run.comparison.ComparisonRecord`): a resumed comparison must compute the same
ones, key by key (:meth:`CompareSettings.differences`).

**One validation style.** Every refusal is a :class:`~moe_lab.config.ConfigError` of one line
that names the key as the user writes it on the command line, the value found and what is
expected: ``compare.seeds=1 is invalid: expected an integer >= 2 (why)``. :func:`_invalid` builds
that line and :func:`_require_int` (the budget's numbers) is the one integer check; refusals that
are not about one key's value (an unknown arm, a reserved override, a config section in the
search space) say what to do instead. It is the shape of the messages of
:func:`moe_lab.config.validate_train_config`, so the comparison and the runs it launches speak
alike, and each message names the override that fixes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_loader import ConfigLoader
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution

from moe_lab.config import ConfigError, validate_train_config
from moe_lab.run.sweep import is_bookkeeping, override_key

from .space import distribution_from_override, flatten_space, format_override, parse_space

__all__ = ["Arm", "CompareSettings"]

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
    "replicate": "the comparison numbers the replicates (compare.replicates=R)",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def _invalid(key: str, value: Any, expected: str) -> ConfigError:
    """The one refusal line: ``KEY=VALUE is invalid: expected EXPECTED``."""
    return ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _require_int(
    value: Any,
    key: str,
    minimum: int,
    why: str = "",
    *,
    minimum_text: str | None = None,
    allow_none: bool = False,
) -> Any:
    """``value`` if it is an int >= ``minimum`` (or None where ``allow_none``), else ConfigError.

    ``why`` follows the expectation as written (`` (reason)`` or ``, so that ...``);
    ``minimum_text`` says where the minimum comes from (``compare.trials (3)``).
    """
    if (value is None and allow_none) or (_is_int(value) and value >= minimum):
        return value
    expected = f"an integer >= {minimum_text or minimum}"
    raise _invalid(key, value, ("null or " if allow_none else "") + expected + why)


@dataclass(frozen=True)
class Arm:
    name: str
    #: the overrides that make this arm's config (``model=...`` first)
    overrides: tuple[str, ...]
    #: the search-space keys that exist in this arm's config
    keys: tuple[str, ...] = ()


#: Settings added to the record after the first comparisons were written, with the value that
#: every earlier comparison had: their records lack the key and still resume.
_ADDED_KEYS: dict[str, Any] = {"replicates": 1}


@dataclass(frozen=True)
class CompareSettings:
    """What a comparison runs with (module docstring); build it with :meth:`from_config`."""

    # the budget
    trials: int
    seeds: int
    final_seed_base: int
    #: independent tuning studies per arm (compare.replicates), each with its own final runs
    replicates: int
    #: trainer.max_epochs of every job
    max_epochs: Any
    # the search
    sampler: str  # "tpe" | "random"
    sampler_seed: int
    tpe_startup_trials: int
    #: jobs per launch; None: one trial per arm per launcher worker
    batch_size: int | None
    # what is compared, and over which space
    arms: Mapping[str, Arm]
    baseline: str | None
    space: Mapping[str, BaseDistribution]
    #: the search space as written (``{"optimizer.lr": "tag(log, interval(1e-4, 3e-2))"}``)
    space_text: Mapping[str, str]
    # the command line
    #: the overrides that every job gets (search ranges and resume= removed)
    base_args: tuple[str, ...]
    #: the comparison dir that ``resume=`` names, resolved; None for a new comparison
    resume: Path | None = None

    def final_seeds_of(self, replicate: int) -> list[int]:
        """Final run ``j`` of replicate ``r`` of every arm trains with seed
        ``final_seed_base + r·seeds + j``: the same seeds in every arm (paired), other seeds in
        every replicate, never a tuning seed."""
        first = self.final_seed_base + replicate * self.seeds
        return list(range(first, first + self.seeds))

    def tune_seed(self, replicate: int, trial: int) -> int:
        """Trial ``i`` of replicate ``r`` of every arm trains with seed ``r·trials + i``."""
        return replicate * self.trials + trial

    @property
    def final_seeds(self) -> list[int]:
        return [s for r in range(self.replicates) for s in self.final_seeds_of(r)]

    @property
    def tune_seeds(self) -> list[int]:
        return [self.tune_seed(r, i) for r in range(self.replicates) for i in range(self.trials)]

    @property
    def overrides(self) -> list[str]:
        """The jobs' overrides that change what is computed (bookkeeping keys left out)."""
        return sorted(a for a in self.base_args if not is_bookkeeping(override_key(a)))

    def to_record(self) -> dict[str, Any]:
        """The record's ``settings`` (:class:`~moe_lab.run.comparison.ComparisonRecord`), as plain
        JSON values."""
        return {
            "arms": {name: list(arm.overrides) for name, arm in self.arms.items()},
            "arm_keys": {name: list(arm.keys) for name, arm in self.arms.items()},
            "trials": self.trials,
            "seeds": self.seeds,
            "replicates": self.replicates,
            "final_seeds": self.final_seeds,
            "tune_seeds": self.tune_seeds,
            "space": dict(self.space_text),
            "sampler": self.sampler,
            "sampler_seed": self.sampler_seed,
            "tpe_startup_trials": self.tpe_startup_trials,
            "max_epochs": self.max_epochs,
            "overrides": self.overrides,
        }

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """The keys of :meth:`to_record` whose value differs from ``recorded`` (a record's
        ``settings``). Recorded overrides are compared without their bookkeeping keys, as this
        comparison's are: a record written before a key joined that list still matches."""
        record = json.loads(json.dumps(self.to_record()))
        saved = dict(recorded)
        if isinstance(saved.get("overrides"), list):
            saved["overrides"] = [
                o for o in saved["overrides"] if not is_bookkeeping(override_key(str(o)))
            ]
        # a key added since the record was written matches while it keeps its default
        absent_default = {k: v for k, v in _ADDED_KEYS.items() if k not in saved}
        return [
            key
            for key, value in record.items()
            if value != saved.get(key) and absent_default.get(key, object()) != value
        ]

    @classmethod
    def from_config(
        cls,
        config: DictConfig,
        config_loader: ConfigLoader,
        arguments: Sequence[str],
        grid_params: Mapping[str, Any] | None = None,
    ) -> CompareSettings:
        """Check the config and the command line (module docstring) and freeze the result.

        Args:
            config: the composed ``compare`` config.
            config_loader: Hydra's config loader (it parses the overrides and composes each
                arm's config).
            arguments: the command line's overrides.
            grid_params: the preset's ``hydra.sweeper.params`` (its ``model`` entry names the
                default arms).

        Raises:
            ConfigError: the first thing that cannot work, in one line.
        """
        cmp = config.get("compare")
        if not isinstance(cmp, DictConfig):
            raise ConfigError("the config has no compare: block (run python -m moe_lab.compare)")
        resume, base_args, cli_space = _split_arguments(arguments, config_loader)

        trials = _require_int(cmp.get("trials"), "compare.trials", 1)
        seeds = _require_int(
            cmp.get("seeds"),
            "compare.seeds",
            2,
            " (the standard error of the final test accuracy needs at least two seeds)",
        )
        replicates = _require_int(cmp.get("replicates", 1), "compare.replicates", 1)
        base = _require_int(
            cmp.get("final_seed_base"),
            "compare.final_seed_base",
            trials * replicates,
            ", so that no final seed is a tuning seed (trial i of replicate r trains with seed "
            "r·trials + i)",
            minimum_text=f"compare.trials × compare.replicates ({trials * replicates})",
        )
        sampler = cmp.get("sampler")
        if sampler not in ("tpe", "random"):
            raise _invalid("compare.sampler", sampler, "tpe or random")
        sampler_seed = _require_int(cmp.get("sampler_seed"), "compare.sampler_seed", 0)
        startup = _require_int(cmp.get("tpe_startup_trials"), "compare.tpe_startup_trials", 1)
        batch = _require_int(cmp.get("batch_size"), "compare.batch_size", 1, allow_none=True)

        arm_names = _arm_names(cmp, grid_params or {})
        arm_overrides = {name: _arm_overrides(cmp, name, config_loader) for name in arm_names}
        baseline = cmp.get("baseline")
        if baseline is not None and baseline not in arm_overrides:
            raise ConfigError(f"compare.baseline={baseline!r} is not one of the arms {arm_names}")

        flat = flatten_space(config.get("hparams_search") or {})
        space, space_text = parse_space({**flat, **cli_space})
        arm_keys = _check_arm_configs(config, config_loader, base_args, arm_overrides, space)
        return cls(
            trials=trials,
            seeds=seeds,
            final_seed_base=base,
            replicates=replicates,
            max_epochs=OmegaConf.select(config, "trainer.max_epochs"),
            sampler=sampler,
            sampler_seed=sampler_seed,
            tpe_startup_trials=startup,
            batch_size=batch,
            arms={name: Arm(name, arm_overrides[name], arm_keys[name]) for name in arm_names},
            baseline=baseline,
            space=space,
            space_text=space_text,
            base_args=base_args,
            resume=resume,
        )


def _split_arguments(
    arguments: Sequence[str], config_loader: ConfigLoader
) -> tuple[Path | None, tuple[str, ...], dict[str, str]]:
    """Sort the command line into ``resume``, the jobs' overrides and search ranges."""
    parser = OverridesParser.create(config_loader=config_loader)
    resume: Path | None = None
    base_args: list[str] = []
    cli_space: dict[str, str] = {}
    for override in parser.parse_overrides(list(arguments)):
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
        base_args.append(override.input_line)
    return resume, tuple(base_args), cli_space


def _arm_names(cmp: DictConfig, grid_params: Mapping[str, Any]) -> list[str]:
    arms = cmp.get("arms")
    if arms is None:
        grid = grid_params.get("model")
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
        raise _invalid("compare.arms", arms, "a list of arm names")
    if len(arms) == 0 or any(not a for a in arms):
        raise _invalid("compare.arms", arms, "at least one arm name")
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


def _arm_overrides(cmp: DictConfig, name: str, config_loader: ConfigLoader) -> tuple[str, ...]:
    defined = cmp.get("arm_overrides") or {}
    if name in defined:
        overrides = defined[name]
        if isinstance(overrides, str):
            overrides = [overrides]
        if not isinstance(overrides, ListConfig | list) or not all(
            isinstance(o, str) for o in overrides
        ):
            raise _invalid(
                f"compare.arm_overrides.{name}",
                _plain(overrides),
                "a list of overrides such as [model=moe, experts=k4]",
            )
        overrides = list(overrides)
        if not any(o.startswith("model=") for o in overrides):
            overrides.insert(0, f"model={name}")
        return tuple(overrides)
    models = config_loader.get_group_options("model")
    if name not in models:
        raise ConfigError(
            f"unknown arm {name!r}: it is neither a model config ({', '.join(models)}) nor "
            "defined in compare.arm_overrides"
        )
    return (f"model={name}",)


def _check_arm_configs(
    config: DictConfig,
    config_loader: ConfigLoader,
    base_args: Sequence[str],
    arm_overrides: Mapping[str, Sequence[str]],
    space: Mapping[str, BaseDistribution],
) -> dict[str, tuple[str, ...]]:
    """Compose and validate every arm's config; its search-space keys, per arm."""

    def compose(overrides: list[str]) -> DictConfig:
        return config_loader.load_sweep_config(config, overrides)

    missing = object()
    arm_keys: dict[str, tuple[str, ...]] = {}
    for name, overrides in arm_overrides.items():
        try:
            cfg = compose([*base_args, *overrides])
        except Exception as err:
            raise ConfigError(
                f"arm {name!r} ({' '.join(overrides)}): its config does not compose: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
        keys: list[str] = []
        for key in space:
            value = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
            if value is missing:
                continue
            if OmegaConf.is_config(OmegaConf.select(cfg, key)):
                raise ConfigError(
                    f"search-space key {key} is a config section in arm {name!r}, not "
                    "one value; search its values (e.g. {key}.<name>) instead"
                )
            keys.append(key)
        arm_keys[name] = tuple(keys)
        val_split = OmegaConf.select(cfg, "data.val_split")
        if not isinstance(val_split, int | float) or isinstance(val_split, bool):
            raise _invalid("data.val_split", val_split, "a fraction in (0, 1)")
        if val_split <= 0:
            raise ConfigError(
                f"data.val_split={val_split} is refused: with no held-out validation split "
                "the test set would be the validation set, and tuning would see it. Set "
                "data.val_split=0.1 (a fraction of the training set)"
            )
        # Every value at the lower end of its range: the trial configs then compose too.
        probe = compose(
            [
                *base_args,
                *overrides,
                *(format_override(k, _probe_value(space[k])) for k in keys),
                "seed=0",
            ]
        )
        try:
            validate_train_config(probe)
        except ConfigError as err:
            raise ConfigError(f"arm {name!r}: {err}") from None
        try:  # the network too: a block that cannot be built must stop us before any training
            from moe_lab.assembly import build_network  # torch loads only when it is needed

            build_network(probe)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"arm {name!r}: its model cannot be built: {first}") from None
    unknown = [key for key in space if not any(key in keys for keys in arm_keys.values())]
    if unknown:
        raise ConfigError(
            f"unknown search-space key(s) {unknown}: no arm's config has them (keys are "
            "dotted config paths such as optimizer.lr)"
        )
    return arm_keys


def _probe_value(dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low  # type: ignore[attr-defined]
