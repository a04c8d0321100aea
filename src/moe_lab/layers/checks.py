"""The checks of :class:`~moe_lab.layers.base.MoEBase`'s keywords, called by its ``__init__``
(which stays the one place where they are validated and stored), and the variant keywords' part
of ``extra_repr``. Each check raises a ValueError naming the keyword. Imports the standard
library only.
"""

from __future__ import annotations

import math
from typing import Any

#: ``balance`` modes: DeepSeek-V3's selection-only bias (see :mod:`~moe_lab.layers.balance`)
BALANCE_MODES: tuple[str, ...] = ("aux_free",)


def check_positive_int(value: object, argname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argname} must be a positive integer, got {value!r}")
    return value


def check_scale(value: object, argname: str) -> float:
    try:
        scale = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{argname} must be a non-negative number, got {value!r}") from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{argname} must be a finite number >= 0, got {value!r}")
    return scale


GATE_INPUT_HELP = (
    "'full' (the original's gate, from the whole input volume) or 'pooled' (from the globally "
    "average-pooled channels)"
)
BACKEND_HELP = (
    "'auto' (pick the faster exact one), 'channels' (the original's: every kept expert's output, "
    "then mix) or 'kernel_mix' (mix the kernels, then one convolution; linear experts only)"
)


def check_top_k(top_k: object, n_experts: int) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(
            f"top_k must be None (the dense mixture) or an integer in [1, n_experts={n_experts}], "
            f"got {top_k!r}"
        )
    return top_k


def check_choice(value: object, choices: tuple[str, ...], argname: str, help_text: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{argname} must be {help_text}, got {value!r}")
    return value.lower()


def check_optional_positive_int(value: object, argname: str, none_means: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{argname} must be None ({none_means}) or a positive integer, got {value!r}"
        )
    return value


def finite_number(value: object, argname: str, requirement: str = "") -> float:
    """``float(value)``, or a ValueError naming ``argname`` (and what it must be) for bools,
    non-numbers, NaN and inf."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        must = f"a finite number {requirement}".rstrip()
        raise ValueError(f"{argname} must be {must}, got {value!r}")
    return number


def check_temperature(value: object) -> float:
    tau = finite_number(value, "gate_temperature", "> 0")
    if tau <= 0:
        raise ValueError(f"gate_temperature must be a finite number > 0, got {value!r}")
    return tau


def check_balance(balance: object, rate: object, top_k: int | None) -> tuple[str | None, float]:
    checked_rate = finite_number(rate, "balance_rate", ">= 0")
    if checked_rate < 0:
        raise ValueError(f"balance_rate must be a finite number >= 0, got {rate!r}")
    if balance is None:
        return None, checked_rate
    if not isinstance(balance, str) or balance.lower() not in BALANCE_MODES:
        raise ValueError(
            f"balance must be None or 'aux_free' (DeepSeek-V3's selection-only bias), "
            f"got {balance!r}"
        )
    if top_k is None:
        raise ValueError(
            "balance='aux_free' biases which experts top-k routing keeps, and top_k=None "
            "computes every expert; set top_k (e.g. top_k=1 or 2), or balance=None"
        )
    return balance.lower(), checked_rate


def check_capacity(value: object, top_k: int | None, expert_softmax: bool) -> float | None:
    if value is None:
        return None
    if expert_softmax:
        raise ValueError(
            "capacity_factor drops assignments, and expert_activation='softmax' normalises "
            "across all experts; use an elementwise expert activation, or capacity_factor=None"
        )
    factor = finite_number(value, "capacity_factor", "> 0 (or None)")
    if factor <= 0:
        raise ValueError(f"capacity_factor must be None or a finite number > 0, got {value!r}")
    if top_k is None:
        raise ValueError(
            "capacity_factor limits how many top-k assignments each expert takes, and top_k=None "
            "computes every expert for every sample; set top_k, or capacity_factor=None"
        )
    return factor


def check_shared_experts(value: object, expert_softmax: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"n_shared_experts must be an integer >= 0, got {value!r}")
    if value and expert_softmax:
        raise ValueError(
            "expert_activation='softmax' normalises across the routed experts and has no meaning "
            "for shared experts, whose outputs are added; use an elementwise expert activation, "
            "or n_shared_experts=0"
        )
    return value


def resolve_gate_groups(gate_groups: int | None, out_channels: int) -> int:
    """The conv layers' gate count G: ``out_channels`` for None (a gate per filter), else
    ``gate_groups``, which must divide ``out_channels``."""
    if gate_groups is None:
        return out_channels
    if out_channels % gate_groups:
        raise ValueError(
            f"gate_groups={gate_groups} must divide out_channels={out_channels} (filter f uses "
            f"gate f // (out_channels / gate_groups)); use a divisor of {out_channels}, 1 (one "
            "gate for the layer) or None (one per filter)"
        )
    return gate_groups


def variants_repr(layer: Any) -> list[str]:
    """The variant keywords that differ from their defaults, for ``extra_repr``."""
    parts = []
    if layer.gate_groups is not None:
        parts.append(f"gate_groups={layer.gate_groups}")
    if layer.gate_hidden is not None:
        parts.append(f"gate_hidden={layer.gate_hidden}")
    if layer.gate_temperature != 1.0:
        parts.append(f"gate_temperature={layer.gate_temperature:g}")
    if layer.balance is not None:
        parts.append(f"balance={layer.balance!r}, balance_rate={layer.balance_rate:g}")
    if layer.capacity_factor is not None:
        parts.append(f"capacity_factor={layer.capacity_factor:g}")
    if layer.n_shared_experts:
        parts.append(f"n_shared_experts={layer.n_shared_experts}")
    return parts
