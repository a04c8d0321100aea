"""Expected validation performance (Dodge et al. 2019, "Show Your Work").

Given the N validation scores of an arm's tuning trials, the expected best score after n trials is
the expected maximum of n draws *with replacement* from their empirical distribution. With the
scores sorted ascending, ``v_(1) <= ... <= v_(N)``, the maximum of n draws is ``v_(i)`` or below
with probability ``(i / N)^n``, so

    E[max_n] = sum_i v_(i) * [(i / N)^n - ((i - 1) / N)^n]
    Var[max_n] = sum_i v_(i)^2 * [(i / N)^n - ((i - 1) / N)^n] - E[max_n]^2

exactly (ties are handled by the same sum: tied values share their probability mass). n may exceed
N. The curve answers "what would a reader expect to find with a budget of n trials?", so that a
verdict can be read as a function of the tuning budget rather than at one arbitrary budget.

The trials are treated as i.i.d. draws. That is exact for random search; for an adaptive sampler
(TPE) the later trials depend on the earlier ones, and the curve is the usual approximation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

__all__ = ["expected_max", "expected_max_curve", "max_draw_weights"]


def _scores(values: Iterable[float]) -> np.ndarray:
    scores = np.asarray(list(values), dtype=float)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError("expected validation performance needs at least one trial score")
    if not np.isfinite(scores).all():
        raise ValueError(
            f"trial scores must be finite numbers, got {scores.tolist()}; give failed trials an "
            "explicit score (e.g. 0) or leave them out"
        )
    return np.sort(scores)


def max_draw_weights(n_scores: int, n: int) -> np.ndarray:
    """``w_i = (i / N)^n - ((i - 1) / N)^n`` for i = 1..N: the probability that the maximum of n
    draws with replacement from N sorted values is the i-th smallest. Sums to 1."""
    if n_scores < 1 or n < 1:
        raise ValueError(f"need N >= 1 scores and n >= 1 draws, got N={n_scores}, n={n}")
    i = np.arange(n_scores + 1, dtype=float) / n_scores
    cdf = i**n
    return np.diff(cdf)


def expected_max(scores: Iterable[float], n: int) -> tuple[float, float]:
    """``(E[max], Var[max])`` of n draws with replacement from ``scores`` (formula above)."""
    values = _scores(scores)
    weights = max_draw_weights(values.size, n)
    mean = float(weights @ values)
    # E[X^2] - E[X]^2 can come out a hair below 0 in floating point when all mass is on one value
    var = max(float(weights @ values**2) - mean**2, 0.0)
    return mean, var


def expected_max_curve(scores: Iterable[float], n_max: int | None = None) -> pd.DataFrame:
    """The expected best score for n = 1 .. ``n_max`` trials (default N, the number of scores).

    Returns columns ``n``, ``mean`` (E[max_n]), ``var``, ``std`` (its square root: the spread
    Dodge et al. draw around the curve) and ``n_trials`` (N).
    """
    values = _scores(scores)
    n_max = values.size if n_max is None else int(n_max)
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    rows = []
    for n in range(1, n_max + 1):
        mean, var = expected_max(values, n)
        rows.append({"n": n, "mean": mean, "var": var, "std": var**0.5, "n_trials": values.size})
    return pd.DataFrame(rows)
