"""Width matching: the one multiplier on a plain CNN's widths that matches a target size or cost.

Every conv's channels and the hidden dense width are ``max(1, floor(w * m + 0.5))``, so the
plain model's parameters (or FLOPs) are a non-decreasing step function of ``m``. The search
brackets the target, bisects ``m`` down to the step where the measure crosses the target, takes
the closer of the two steps either side, and reports a short multiplier inside that step (so the
number written to a summary rebuilds exactly the same widths).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .topology import TopologySpec, scale_width

MATCH_KINDS = ("params", "flops")
_MAX_MULTIPLIER = 2.0**16
_REL_PRECISION = 1e-9


class WidthMatchError(ValueError):
    """No multiplier comes within tolerance of the target. ``below`` and ``above`` are the
    closest achievable ``(width_multiplier, value)`` pairs either side (``below`` is None when
    even the narrowest model, every width 1, exceeds the target)."""

    def __init__(
        self,
        message: str,
        target: int,
        below: tuple[float, int] | None,
        above: tuple[float, int],
    ) -> None:
        super().__init__(message)
        self.target = target
        self.below = below
        self.above = above


@dataclass(frozen=True)
class WidthMatch:
    """The search result: the multiplier, the measure it achieves, and the closest achievable
    values either side of the target (equal to ``achieved`` on the side it was picked from)."""

    width_multiplier: float
    target: int
    achieved: int
    below: tuple[float, int] | None
    above: tuple[float, int] | None

    @property
    def rel_error(self) -> float:
        return abs(self.achieved - self.target) / self.target


def _step_interval(base: tuple[int, ...], widths: tuple[int, ...]) -> tuple[float, float]:
    """The half-open range ``[lo, hi)`` of multipliers whose rounded widths are ``widths``."""
    lo, hi = 0.0, math.inf
    for b, w in zip(base, widths, strict=True):
        # floor(b*m + 0.5) = w  <=>  (w - 0.5)/b <= m < (w + 0.5)/b; width 1 also covers m -> 0
        lo = max(lo, (w - 0.5) / b if w > 1 else 0.0)
        hi = min(hi, (w + 0.5) / b)
    return lo, hi


def _short_multiplier(base: tuple[int, ...], widths: tuple[int, ...]) -> float:
    """A multiplier with few significant digits that rebuilds exactly ``widths``."""
    lo, hi = _step_interval(base, widths)
    middle = (lo + hi) / 2
    for digits in range(2, 17):
        m = float(f"{middle:.{digits}g}")
        if m > 0 and tuple(scale_width(b, m) for b in base) == widths:
            return m
    return middle


def match_width(
    spec: TopologySpec,
    measure: Callable[[float], int],
    target: int,
    *,
    tolerance: float = 0.01,
    what: str = "params",
) -> WidthMatch:
    """Find the width multiplier whose ``measure`` is closest to ``target``.

    Args:
        spec: the unscaled topology (its base widths define the rounding steps).
        measure: ``m -> value`` of the plain model built with width multiplier ``m``; must be
            non-decreasing in ``m`` (parameters and FLOPs are).
        target: the value to match (the MoE model's).
        tolerance: the largest relative error accepted.
        what: the name of the measure, for messages.

    Raises:
        WidthMatchError: (a ValueError) if no multiplier comes within ``tolerance`` of the target (the rounding
        steps of a tiny network can be coarse), naming the closest achievable values.
    """
    if target < 1:
        raise ValueError(f"the matching target ({what}) must be positive, got {target}")
    base = spec.base_widths()

    def widths(m: float) -> tuple[int, ...]:
        return tuple(scale_width(b, m) for b in base)

    cache: dict[tuple[int, ...], int] = {}

    def value(m: float) -> int:
        key = widths(m)
        if key not in cache:
            cache[key] = int(measure(m))
        return cache[key]

    # m -> 0 gives every width 1: the smallest model there is.
    smallest = 1.0 / (2 * max(base))
    if value(smallest) >= target:
        lo, hi = None, smallest
    else:
        lo, hi = smallest, 1.0
        while value(hi) < target:
            lo, hi = hi, hi * 2
            if hi > _MAX_MULTIPLIER:
                raise ValueError(
                    f"no width multiplier up to {_MAX_MULTIPLIER:g} reaches the target {what} "
                    f"{target} (multiplier {lo:g} gives {value(lo)})"
                )
        # Invariant: value(lo) < target <= value(hi). Narrow until the two are adjacent steps.
        while hi - lo > _REL_PRECISION * hi:
            mid = (lo + hi) / 2
            if widths(mid) == widths(hi):
                hi = mid
            elif widths(mid) == widths(lo) or value(mid) < target:
                lo = mid
            else:
                hi = mid

    above = (_short_multiplier(base, widths(hi)), value(hi))
    below = None if lo is None else (_short_multiplier(base, widths(lo)), value(lo))
    best = above
    if below is not None and target - below[1] < above[1] - target:
        best = below
    result = WidthMatch(
        width_multiplier=best[0], target=target, achieved=best[1], below=below, above=above
    )
    if result.rel_error > tolerance:
        sides = []
        if below is not None:
            sides.append(f"{below[1]} at width_multiplier={below[0]:g}")
        sides.append(f"{above[1]} at width_multiplier={above[0]:g}")
        raise WidthMatchError(
            f"cannot match {what} within {tolerance:.1%}: the target is {target}, and the "
            f"closest achievable values are {' and '.join(sides)} (integer channel widths make "
            f"{what} a step function of the multiplier; a larger topology has finer steps, or raise "
            f"match_tolerance)",
            target,
            below,
            above,
        )
    return result
