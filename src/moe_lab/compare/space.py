"""The search space of a comparison: config keys mapped to Hydra sweep expressions, as Optuna
distributions.

A space is written in ``conf/hparams_search/<name>.yaml`` as nested keys (``optimizer: {lr: ...}``
is the key ``optimizer.lr``) whose values use Hydra's sweep syntax:

- ``interval(low, high)``: a float in [low, high]; ``int(interval(low, high))``: an int;
- ``tag(log, interval(low, high))``: the same on a log scale (low > 0);
- ``choice(a, b, ...)`` (or ``a,b,...``): one of the values;
- ``range(start, stop[, step])``: ints start, start + step, ... below stop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from moe_lab.config import ConfigError

__all__ = ["distribution_from_override", "flatten_space", "format_override", "parse_space"]

_SYNTAX = (
    "interval(low, high), tag(log, interval(low, high)), choice(a, b, ...) or range(start, stop)"
)


def flatten_space(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{optimizer: {lr: X}}`` -> ``{"optimizer.lr": X}`` (leaves are the sweep expressions)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if not isinstance(node, Mapping):
        raise ConfigError(
            f"hparams_search must map config keys to search ranges, got {node!r}; e.g. "
            "optimizer: {lr: 'tag(log, interval(1e-4, 3e-2))'}"
        )
    flat: dict[str, Any] = {}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping | DictConfig):
            flat.update(flatten_space(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def distribution_from_override(override: Override) -> BaseDistribution:
    """The Optuna distribution of one parsed ``key=<sweep expression>`` override."""
    key = override.key_or_group
    value = override.value()
    where = f"search-space entry {key}={override.get_value_string()!r}"
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if not (_number(low) and _number(high)) or not low < high:
            raise ConfigError(f"{where}: interval(low, high) needs numbers with low < high")
        if log_scale and low <= 0:
            raise ConfigError(f"{where}: a log-scale interval needs low > 0")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop, step)):
            raise ConfigError(f"{where}: range(start, stop[, step]) takes ints; use interval()")
        values = list(range(start, stop, step))
        if not values:
            raise ConfigError(f"{where}: the range is empty")
        if len(values) == 1:
            raise ConfigError(f"{where}: the range holds one value: nothing to search")
        return IntDistribution(values[0], values[-1], step=abs(step), log=log_scale)
    if isinstance(value, ChoiceSweep):
        choices = list(value.list)
        if len(choices) < 2:
            raise ConfigError(f"{where}: choice() needs at least two values")
        if not all(c is None or isinstance(c, bool | int | float | str) for c in choices):
            raise ConfigError(f"{where}: choice() values must be numbers, strings, bools or null")
        if log_scale:
            raise ConfigError(f"{where}: tag(log, ...) applies to interval() and range() only")
        return CategoricalDistribution(choices)
    raise ConfigError(f"{where} is not a search range: write {_SYNTAX}")


def parse_space(flat: Mapping[str, Any]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """``{key: expression}`` -> (``{key: distribution}``, ``{key: expression text}``).

    Raises:
        ConfigError: an empty space, an empty entry, or an expression that is not a range.
    """
    if not flat:
        raise ConfigError(
            "the search space is empty: pick one with hparams_search=NAME (conf/hparams_search/) "
            "or add ranges such as 'hparams_search.optimizer.lr=tag(log, interval(1e-4, 1e-2))'"
        )
    parser = OverridesParser.create()
    distributions: dict[str, BaseDistribution] = {}
    texts: dict[str, str] = {}
    for key, expression in flat.items():
        if expression is None or (isinstance(expression, str) and not expression.strip()):
            raise ConfigError(
                f"search-space entry {key} is empty: give it a range ({_SYNTAX}) or remove it "
                f"with ~hparams_search.{key}"
            )
        if isinstance(expression, ListConfig | list | tuple):
            raise ConfigError(
                f"search-space entry {key}={list(expression)!r} is a list: write choice(...)"
            )
        text = str(expression)
        try:
            (override,) = parser.parse_overrides([f"{key}={text}"])
        except Exception as err:  # Hydra's grammar errors are long; keep the gist
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"search-space entry {key}={text!r} cannot be parsed ({message}); write {_SYNTAX}"
            ) from None
        distributions[key] = distribution_from_override(override)
        texts[key] = text
    return distributions, texts


_PLAIN = re.compile(r"^[A-Za-z0-9_./+\-]+$")


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override syntax, exact for floats (shortest round-trip repr)."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, int):
        return f"{key}={value}"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}={value} is not a finite number")
        return f"{key}={value!r}"
    text = str(value)
    plain = (
        _PLAIN.match(text)
        and text.lower() not in ("null", "true", "false", "nan", "inf", "-inf", "+inf")
        and not re.match(r"^[+\-]?[0-9.]", text)  # would parse as a number
    )
    return f"{key}={text if plain else _quote(text)}"
