"""Expected validation performance against brute-force enumeration of every tuple of draws."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from moe_lab.analysis.evp import expected_max, expected_max_curve, max_draw_weights


def _enumerate(scores: list[float], n: int) -> tuple[float, float]:
    """Mean and variance of max over all N^n equally likely ordered tuples of n draws."""
    maxima = [max(draw) for draw in itertools.product(scores, repeat=n)]
    assert len(maxima) == len(scores) ** n
    return statistics.fmean(maxima), statistics.pvariance(maxima)


CASES = [
    [0.5],
    [0.1, 0.9],
    [0.7, 0.7, 0.2],  # ties
    [0.91, 0.12, 0.55, 0.55, 0.99],
    [0.3, 0.8, 0.4, 0.6, 0.2, 0.75],
]


@pytest.mark.parametrize("scores", CASES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_expected_max_matches_enumeration(scores: list[float], n: int) -> None:
    mean, var = expected_max(scores, n)
    ref_mean, ref_var = _enumerate(scores, n)
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert var == pytest.approx(ref_var, abs=1e-12)


def test_random_cases_match_enumeration() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        size = int(rng.integers(1, 6))
        scores = rng.choice([0.1, 0.2, 0.5, 0.8, 0.95], size=size).tolist()  # many ties
        n = int(rng.integers(1, 5))
        mean, var = expected_max(scores, n)
        ref_mean, ref_var = _enumerate(scores, n)
        assert mean == pytest.approx(ref_mean, abs=1e-12)
        assert var == pytest.approx(ref_var, abs=1e-12)


def test_curve_limits_and_shape() -> None:
    scores = [0.2, 0.9, 0.5, 0.4]
    curve = expected_max_curve(scores, n_max=40)
    assert list(curve["n"]) == list(range(1, 41))
    # one draw: the plain mean; many draws: the best score, with vanishing spread
    assert curve["mean"].iloc[0] == pytest.approx(statistics.fmean(scores))
    assert curve["var"].iloc[0] == pytest.approx(statistics.pvariance(scores))
    assert curve["mean"].iloc[-1] == pytest.approx(0.9, abs=1e-4)
    assert curve["std"].iloc[-1] < 0.01
    assert (np.diff(curve["mean"]) >= -1e-15).all()  # more trials never hurt in expectation
    assert (curve["n_trials"] == 4).all()
    assert len(expected_max_curve(scores)) == 4  # default n_max = N


def test_weights_sum_to_one() -> None:
    for n_scores, n in [(1, 1), (5, 3), (12, 24)]:
        weights = max_draw_weights(n_scores, n)
        assert weights.shape == (n_scores,)
        assert weights.sum() == pytest.approx(1.0)
        assert (weights >= 0).all()
        assert weights[-1] == pytest.approx(1 - ((n_scores - 1) / n_scores) ** n)


@pytest.mark.parametrize(
    ("scores", "match"),
    [([], "at least one"), ([0.5, math.nan], "finite"), ([0.5, math.inf], "finite")],
)
def test_bad_scores(scores: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expected_max(scores, 1)


def test_bad_n() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        expected_max([0.5], 0)
    with pytest.raises(ValueError, match="n_max"):
        expected_max_curve([0.5], n_max=0)
