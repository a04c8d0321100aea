"""Each arm against a baseline arm, with uncertainty from every source, paired where the design pairs.

The design (a comparison, :mod:`moe_lab.compare`): each arm is tuned (a tuning study), then its best
config is re-run with ``S`` final seeds shared by every arm (seed ``j`` is the same seed index, so
the same data order, in every arm), and each final run scores the same ``N`` test examples. A
comparison may repeat the whole tuning ``R`` times (independent tuning studies, *replicates*). For
arm ``A``, replicate ``r``, seed ``j`` and test example ``i``:

    correct[A][r, j, i] ∈ {0, 1},        acc[A][r, j] = (1/N) Σ_i correct[A][r, j, i]

Three sources of variance and how each is paired:

============== ====================================== =============================================
source         resampled as                           shared by the two arms?
============== ====================================== =============================================
tuning         replicates ``r`` (tuning studies)      no: each arm's studies are independent
final seed     seeds ``j`` within a replicate         yes: seed ``j`` is the same seed in every arm
test examples  examples ``i``                         yes: every run scores the same test set
============== ====================================== =============================================

Functions (each documents its formula):

- :class:`PairedData`: the ``correct`` arrays of every arm, shape ``(R, S, N)``, checked equal.
- :func:`paired_difference`: mean of the per-cell differences and a paired t-test over the
  ``(replicate, seed)`` cells (:func:`scipy.stats.ttest_rel`).
- :func:`bootstrap_difference` (:func:`bootstrap_draws`): the hierarchical bootstrap of the
  difference of mean accuracy, paired over seeds and examples.
- :func:`probability_of_improvement`: P(a random run of the arm beats a random run of the
  baseline), ties ½, with a bootstrap interval over runs.
- :func:`holm`: Holm–Bonferroni adjusted p-values.
- :func:`effect_size_note`: says when an effect size would be meaningless.
- :func:`compare_to_baseline`: all of the above, one row per arm.

Pure numpy/scipy/pandas: nothing here reads run dirs or imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from .stats import hedges_g

__all__ = [
    "MIN_RUNS_FOR_EFFECT_SIZE",
    "MIN_SD_FOR_EFFECT_SIZE",
    "PairedData",
    "bootstrap_difference",
    "bootstrap_draws",
    "compare_to_baseline",
    "effect_size_note",
    "holm",
    "paired_difference",
    "probability_of_improvement",
    "run_accuracies",
]

#: Below this many runs per arm an effect size is not reported as meaningful (see
#: :func:`effect_size_note`).
MIN_RUNS_FOR_EFFECT_SIZE = 5
#: Below this pooled SD of run accuracy (a fraction: 1e-3 = 0.1 percentage points) an effect size
#: is not reported as meaningful (see :func:`effect_size_note`).
MIN_SD_FOR_EFFECT_SIZE = 1e-3
#: The bootstrap works on this many (draw × example) indices at a time (16 MiB per int64 array),
#: whatever ``n_boot`` and ``N``.
_CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def _as_correct(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` as a read-only boolean array of shape ``(R, S, N)``; ValueError naming ``name``
    when it is not 3-D, is empty, or holds anything but 0 and 1."""
    array = np.asarray(values)
    if array.ndim != 3:
        raise ValueError(
            f"arm {name!r}: correct must have shape (replicates R, seeds S, examples N), got "
            f"shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"arm {name!r}: correct is empty, shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(
                f"arm {name!r}: correct must hold only 0/1 (or booleans); found "
                f"{np.unique(array[~np.isin(array, (0, 1))])[:5].tolist()}"
            )
        array = array.astype(bool)
    else:
        array = array.copy()
    array.flags.writeable = False
    return array


_AXES = ("replicates R", "seeds S", "examples N")


def _check_same_shape(
    name: str, shape: tuple[int, ...], ref: str, ref_shape: tuple[int, ...]
) -> None:
    """ValueError naming both arms, both shapes and the axes that differ."""
    if shape == ref_shape:
        return
    differs = ", ".join(
        f"{axis}: {a} vs {b}" for axis, a, b in zip(_AXES, shape, ref_shape, strict=True) if a != b
    )
    raise ValueError(
        f"arm {name!r} has correct of shape {shape} but arm {ref!r} has {ref_shape} ({differs}); "
        "every arm needs the same replicates R, seeds S and test examples N, in the same order"
    )


@dataclass(frozen=True)
class PairedData:
    """Per arm, which test examples each final run got right.

    ``correct[arm][r, j, i]`` is 1 (True) when the run of ``arm`` from replicate (tuning study)
    ``r`` with final seed ``j`` classifies test example ``i`` correctly. Every arm must have the
    same shape ``(R, S, N)`` (equal replicates, seeds and examples; R ≥ 1, S ≥ 1), with seed ``j``
    and example ``i`` meaning the same seed and example in every arm: that is what the pairing
    relies on. Arrays are copied to read-only booleans.

    Raises:
        ValueError: no arm, an array that is not 3-D or not 0/1, or shapes that differ (the
            message names the arm, both shapes and the axes that differ).
    """

    correct: Mapping[str, np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.correct:
            raise ValueError("PairedData needs at least one arm")
        checked = {
            str(name): _as_correct(str(name), values) for name, values in self.correct.items()
        }
        ref = next(iter(checked))
        for name, array in checked.items():
            _check_same_shape(name, array.shape, ref, checked[ref].shape)
        object.__setattr__(self, "correct", checked)

    @classmethod
    def from_predictions(
        cls, predictions: Mapping[str, ArrayLike], labels: ArrayLike
    ) -> PairedData:
        """From each arm's predicted classes, shape ``(R, S, N)`` of ints, and the ``N`` labels.

        Raises:
            ValueError: ``labels`` is not 1-D, or an arm's last axis is not ``N`` long.
        """
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
        correct = {}
        for name, predicted in predictions.items():
            predicted = np.asarray(predicted)
            if predicted.ndim != 3 or predicted.shape[-1] != labels.shape[0]:
                raise ValueError(
                    f"arm {name!r}: predictions must have shape (R, S, N={labels.shape[0]}), got "
                    f"{predicted.shape}"
                )
            correct[name] = predicted == labels
        return cls(correct)

    @property
    def arms(self) -> list[str]:
        return list(self.correct)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(R, S, N)``, shared by every arm."""
        return next(iter(self.correct.values())).shape  # type: ignore[return-value]

    @property
    def n_replicates(self) -> int:
        return self.shape[0]

    @property
    def n_seeds(self) -> int:
        return self.shape[1]

    @property
    def n_examples(self) -> int:
        return self.shape[2]

    def accuracies(self, arm: str) -> np.ndarray:
        """``acc[r, j]``: the test accuracy of each final run of ``arm``, shape ``(R, S)``."""
        return run_accuracies(self.correct[arm])


def run_accuracies(correct: ArrayLike) -> np.ndarray:
    """``acc[r, j] = (1/N) Σ_i correct[r, j, i]``, shape ``(R, S)``."""
    return _as_correct("arm", correct).mean(axis=2)


def _pair(arm: ArrayLike, base: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_correct("arm", arm), _as_correct("base", base)
    _check_same_shape("arm", a.shape, "base", b.shape)
    return a, b


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_n_boot(n_boot: int) -> None:
    if int(n_boot) != n_boot or n_boot < 2:
        raise ValueError(f"n_boot must be an integer ≥ 2, got {n_boot}")


def _percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval: the ``(1 − c)/2`` and ``(1 + c)/2`` quantiles of ``draws``
    (:func:`numpy.quantile`, linear interpolation)."""
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# paired t-test over (replicate, seed) cells
# ----------------------------------------------------------------------------------------------

PAIRED_COLUMNS: tuple[str, ...] = (
    "paired_diff",
    "paired_sd",
    "paired_se",
    "paired_ci_low",
    "paired_ci_high",
    "paired_t",
    "paired_df",
    "paired_p",
    "paired_n",
)


def paired_difference(arm: ArrayLike, base: ArrayLike, confidence: float = 0.95) -> dict[str, Any]:
    """Paired difference of test accuracy, ``arm − base``, over the shared ``(replicate, seed)``
    cells, and a two-sided paired t-test (:func:`scipy.stats.ttest_rel`).

    With ``d[r, j] = acc_arm[r, j] − acc_base[r, j]`` over the ``n = R·S`` cells:

        paired_diff = mean(d),   paired_sd = sd(d) (ddof 1),   paired_se = paired_sd / sqrt(n)
        paired_t = paired_diff / paired_se,   paired_df = n − 1
        paired_p = 2 · P(T_{n−1} > |paired_t|)
        paired_ci = paired_diff ± t_{(1+c)/2, n−1} · paired_se

    Seed ``j`` pairs the two arms (same seed, same data order), which removes the seed's shared
    effect from ``d``. With ``R > 1`` the R·S cells are pooled as independent pairs, replicate
    ``r`` of the arm beside replicate ``r`` of the baseline by index only: the test then ignores
    that the S cells of a replicate share one tuning outcome, so it can be too narrow when tuning
    varies; :func:`bootstrap_difference` resamples the replicates and is the interval to read.

    Args:
        arm, base: ``correct`` arrays, shape ``(R, S, N)``, equal shapes.
        confidence: level of the interval.

    Returns:
        ``paired_diff, paired_sd, paired_se, paired_ci_low, paired_ci_high, paired_t, paired_df,
        paired_p, paired_n`` (floats; NaN where undefined), ``paired_cell_diffs`` (the ``(R, S)``
        array ``d``) and ``paired_note`` (why the test is undefined, else ``""``): one cell
        (n = 1), or every cell's difference equal (sd = 0).
    """
    _check_confidence(confidence)
    a, b = _pair(arm, base)
    acc_a, acc_b = a.mean(axis=2), b.mean(axis=2)
    d = acc_a - acc_b
    n = d.size
    result: dict[str, Any] = dict.fromkeys(PAIRED_COLUMNS, math.nan)
    result.update(paired_diff=float(d.mean()), paired_n=n, paired_cell_diffs=d, paired_note="")
    if n < 2:
        result["paired_note"] = "one (replicate, seed) cell: no paired t-test"
        return result
    sd = float(d.std(ddof=1))
    result.update(paired_sd=sd, paired_se=sd / math.sqrt(n), paired_df=float(n - 1))
    if sd == 0:
        result["paired_note"] = (
            f"every cell's difference is {d.flat[0]:+.4g}: the paired t-test is undefined"
        )
        return result
    test = stats.ttest_rel(acc_a.ravel(), acc_b.ravel())
    interval = test.confidence_interval(confidence_level=confidence)
    result.update(
        paired_t=float(test.statistic),
        paired_p=float(test.pvalue),
        paired_df=float(test.df),
        paired_ci_low=float(interval.low),
        paired_ci_high=float(interval.high),
    )
    return result


# ----------------------------------------------------------------------------------------------
# hierarchical bootstrap
# ----------------------------------------------------------------------------------------------


def bootstrap_draws(
    arm: ArrayLike, base: ArrayLike, n_boot: int = 10_000, seed: int = 0
) -> np.ndarray:
    """``n_boot`` draws of the hierarchical, paired bootstrap of ``mean acc_arm − mean acc_base``.

    One draw, with ``correct`` arrays of shape ``(R, S, N)``:

    1. examples: ``N`` indices ``i*_1..i*_N`` uniform with replacement from ``0..N−1``, the SAME
       for both arms (one shared test set);
    2. replicates: ``R`` indices ``ρ_A[1..R]`` for the arm and, independently, ``ρ_B[1..R]``
       for the baseline (tuning studies are independent, not paired);
    3. seeds: for each replicate slot ``k``, ``S`` indices ``σ[k, 1..S]`` with replacement,
       the SAME for both arms (seed ``j`` is the same seed in every arm);

    and the draw is

        Δ* = 1/(R·S) Σ_k Σ_m [acc*_A(ρ_A[k], σ[k, m]) − acc*_B(ρ_B[k], σ[k, m])],
        acc*_X(r, j) = (1/N) Σ_n correct_X[r, j, i*_n].

    Resampling every level counts the lower levels' noise again at each level above, so the
    interval errs wide rather than narrow (Davison & Hinkley 1997, §3.8); with few replicates
    (R = 2, 3) the replicate level's spread is underestimated by the usual (R − 1)/R. With R = 1
    step 2 is the identity: no interval contains the variance of the tuning itself.

    How (memory-aware, exact): ``acc*`` is linear in the example counts ``w_i`` (how often
    example ``i`` was drawn), ``acc*(r, j) = (1/N) Σ_i w_i correct[r, j, i]``. The examples are
    first grouped by their *pattern* (the column ``correct[:, :, i]`` of both arms, 2·R·S bits):
    examples with one pattern are interchangeable, so only the count per pattern matters (K ≤ N
    patterns; K is small when most examples are right, or wrong, in every run). Each draw samples
    the ``N`` example indices (:meth:`numpy.random.Generator.integers`), maps them to patterns and
    counts them (:func:`numpy.bincount`), and the counts times the ``(K, 2·R·S)`` pattern matrix
    give every cell's resampled accuracy. Draws are processed in chunks of about 2²¹ / N, so the
    working memory is a few ``(chunk, N)`` integer arrays of 2²¹ entries (16 MiB each; under
    ~100 MiB in all, whatever ``n_boot``, ``N``, ``R`` and ``S``), never an ``(n_boot, R, S, N)``
    array. Time: about 2 s per 10 000 draws at N = 10 000 (R·S = 15, every pattern distinct).

    Deterministic for given ``seed``, ``n_boot`` and shapes (one :func:`numpy.random.default_rng`,
    consumed in a fixed order: per chunk, examples, ρ_A, ρ_B, σ).
    """
    _check_n_boot(n_boot)
    a, b = _pair(arm, base)
    n_rep, n_seeds, n_ex = a.shape
    cells = n_rep * n_seeds
    columns = np.concatenate([a.reshape(cells, n_ex), b.reshape(cells, n_ex)]).T  # (N, 2·R·S)
    patterns, example_pattern = np.unique(columns, axis=0, return_inverse=True)
    example_pattern = example_pattern.ravel()
    n_patterns = patterns.shape[0]
    pattern_matrix = patterns.astype(np.float64)  # (K, 2·R·S)

    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // n_ex))
    draws = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        examples = rng.integers(0, n_ex, size=(size, n_ex))
        offsets = example_pattern[examples] + (np.arange(size) * n_patterns)[:, None]
        counts = np.bincount(offsets.ravel(), minlength=size * n_patterns)
        cell_acc = counts.reshape(size, n_patterns) @ pattern_matrix / n_ex  # (size, 2·R·S)
        acc_a = cell_acc[:, :cells].reshape(size, n_rep, n_seeds)
        acc_b = cell_acc[:, cells:].reshape(size, n_rep, n_seeds)
        rep_a = rng.integers(0, n_rep, size=(size, n_rep))
        rep_b = rng.integers(0, n_rep, size=(size, n_rep))
        seeds = rng.integers(0, n_seeds, size=(size, n_rep, n_seeds))
        row = np.arange(size)[:, None, None]
        picked_a = acc_a[row, rep_a[:, :, None], seeds]
        picked_b = acc_b[row, rep_b[:, :, None], seeds]
        draws[start : start + size] = (picked_a - picked_b).mean(axis=(1, 2))
    return draws


BOOTSTRAP_COLUMNS: tuple[str, ...] = (
    "boot_diff",
    "boot_mean",
    "boot_se",
    "boot_ci_low",
    "boot_ci_high",
    "boot_n",
)


def bootstrap_difference(
    arm: ArrayLike,
    base: ArrayLike,
    n_boot: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """The hierarchical paired bootstrap of the difference of mean test accuracy (arm − base).

    The scheme is :func:`bootstrap_draws`'s (replicates independently per arm; seeds within a
    replicate and test examples shared by both arms). Returns

    - ``boot_diff``: the observed difference, ``mean(acc_arm) − mean(acc_base)`` over all cells;
    - ``boot_mean``: the mean of the draws; ``boot_se``: their SD (ddof 1), the bootstrap SE;
    - ``boot_ci_low``, ``boot_ci_high``: the percentile interval, the ``(1 − c)/2`` and
      ``(1 + c)/2`` quantiles of the draws;
    - ``boot_n``: ``n_boot``.
    """
    _check_confidence(confidence)
    a, b = _pair(arm, base)
    draws = bootstrap_draws(a, b, n_boot=n_boot, seed=seed)
    low, high = _percentile_interval(draws, confidence)
    return {
        "boot_diff": float(a.mean() - b.mean()),
        "boot_mean": float(draws.mean()),
        "boot_se": float(draws.std(ddof=1)),
        "boot_ci_low": low,
        "boot_ci_high": high,
        "boot_n": int(n_boot),
    }


# ----------------------------------------------------------------------------------------------
# probability of improvement
# ----------------------------------------------------------------------------------------------


def _scores(name: str, values: ArrayLike) -> np.ndarray:
    scores = np.asarray(values, dtype=float).ravel()
    scores = scores[~np.isnan(scores)]
    if scores.size == 0:
        raise ValueError(f"probability of improvement: {name} has no score")
    return scores


def _win_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``K[i, j] = 1(a_i > b_j) + ½ · 1(a_i = b_j)``."""
    return (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])


def probability_of_improvement(
    arm: ArrayLike,
    base: ArrayLike,
    n_boot: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """P(arm > baseline): the probability that a random run of the arm scores higher than a random
    run of the baseline, ties counting ½ (Agarwal et al. 2021, rliable's "probability of
    improvement"; Bouthillier et al. 2021):

        P(A > B) = 1/(n_a·n_b) Σ_i Σ_j [1(a_i > b_j) + ½ · 1(a_i = b_j)] = U_A / (n_a·n_b)

    with ``U_A`` the Mann–Whitney U statistic of ``a`` (:func:`scipy.stats.mannwhitneyu`'s
    ``statistic`` for ``x = a``). 0.5: neither arm tends to win; 1: every arm run beats every
    baseline run. It compares runs as wholes, unpaired by definition (a random run of each arm,
    not the same seed): it says how often one would see the arm win, not by how much.

    Interval: percentile bootstrap over runs, the ``n_a`` runs of the arm and the ``n_b`` of the
    baseline resampled independently with replacement (counts ``c_a``, ``c_b``, multinomial), each
    draw ``c_aᵀ K c_b / (n_a·n_b)`` with ``K`` the win matrix above.

    Args:
        arm, base: the run scores (e.g. test accuracies; any shape, flattened; NaN dropped).

    Returns:
        ``p_improvement``, ``p_improvement_se`` (bootstrap SD), ``p_improvement_ci_low``,
        ``p_improvement_ci_high``, ``p_improvement_n_arm``, ``p_improvement_n_base``.
    """
    _check_n_boot(n_boot)
    _check_confidence(confidence)
    a, b = _scores("the arm", arm), _scores("the baseline", base)
    wins = _win_matrix(a, b)
    rng = np.random.default_rng(seed)
    count_a = rng.multinomial(a.size, np.full(a.size, 1 / a.size), size=n_boot)
    count_b = rng.multinomial(b.size, np.full(b.size, 1 / b.size), size=n_boot)
    draws = np.einsum("bi,ij,bj->b", count_a, wins, count_b) / (a.size * b.size)
    low, high = _percentile_interval(draws, confidence)
    return {
        "p_improvement": float(wins.mean()),
        "p_improvement_se": float(draws.std(ddof=1)),
        "p_improvement_ci_low": low,
        "p_improvement_ci_high": high,
        "p_improvement_n_arm": int(a.size),
        "p_improvement_n_base": int(b.size),
    }


# ----------------------------------------------------------------------------------------------
# multiple comparisons, effect-size note
# ----------------------------------------------------------------------------------------------


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values (Holm 1979), step-down.

    With the ``m`` non-NaN p-values sorted ascending, ``p_(1) ≤ … ≤ p_(m)``:

        p̃_(k) = min(1, max_{i ≤ k} (m − i + 1) · p_(i))

    (the running max keeps them monotone in ``p``; ties get equal adjusted values). Rejecting where
    ``p̃ ≤ α`` controls the family-wise error rate at ``α``. NaN p-values pass through as NaN and
    do not count in ``m``. Keys keep their order.

    Raises:
        ValueError: a p-value outside [0, 1].
    """
    values = {key: float(p) for key, p in p_values.items()}
    bad = {key: p for key, p in values.items() if not (math.isnan(p) or 0 <= p <= 1)}
    if bad:
        raise ValueError(f"p-values must be in [0, 1] (or NaN), got {bad}")
    present = sorted((p, i, key) for i, (key, p) in enumerate(values.items()) if not math.isnan(p))
    m = len(present)
    adjusted = dict.fromkeys(values, math.nan)
    running = 0.0
    for rank, (p, _, key) in enumerate(present):
        running = max(running, (m - rank) * p)
        adjusted[key] = min(1.0, running)
    return adjusted


def _pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
    """``sqrt(((n_a − 1) s_a² + (n_b − 1) s_b²) / (n_a + n_b − 2))``; NaN when n_a + n_b < 3."""
    dof = a.size + b.size - 2
    if dof < 1:
        return math.nan
    ss = (a.size - 1) * (a.var(ddof=1) if a.size > 1 else 0.0)
    ss += (b.size - 1) * (b.var(ddof=1) if b.size > 1 else 0.0)
    return math.sqrt(ss / dof)


def effect_size_note(
    values_a: ArrayLike,
    values_b: ArrayLike,
    *,
    min_n: int = MIN_RUNS_FOR_EFFECT_SIZE,
    min_sd: float = MIN_SD_FOR_EFFECT_SIZE,
) -> str:
    """A note when a standardised effect size (Hedges' g) of two samples of run accuracies
    (fractions, NaN dropped) would be meaningless; ``""`` otherwise.

    Thresholds, and why:

    - ``n < min_n = 5`` runs in either arm: the standard error of g at g = 0 is about
      ``sqrt(1/n_a + 1/n_b)`` (Hedges & Olkin 1985), ≥ 0.71 at n = 4 per arm, wider than the whole
      range from "small" (0.2) to "large" (0.8) that g is read against; and with ``n_a + n_b − 2``
      small the small-sample correction J is itself large (J = 0.85 at n = 3 per arm).
    - pooled SD ``< min_sd = 1e-3`` (0.1 percentage points), or undefined: on a 1000-example test
      set one example is 0.1 pp, so the runs then differ by less than one example; g divides the
      difference by that quantisation noise and turns a 0.05 pp difference into "g = 0.5".

    Example: ``"Hedges' g from n=3 per arm with pooled SD 0.12 pp is not a meaningful effect size
    (fewer than 5 runs per arm)"``.
    """
    a = np.asarray(values_a, dtype=float).ravel()
    b = np.asarray(values_b, dtype=float).ravel()
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    sd = _pooled_sd(a, b)
    reasons = []
    if min(a.size, b.size) < min_n:
        reasons.append(f"fewer than {min_n} runs per arm")
    if math.isnan(sd):
        reasons.append("no spread to standardise by")
    elif sd < min_sd:
        reasons.append(f"pooled SD below {100 * min_sd:.2g} pp")
    if not reasons:
        return ""
    runs = f"n={a.size} per arm" if a.size == b.size else f"n={a.size} and n={b.size}"
    spread = "undefined SD" if math.isnan(sd) else f"pooled SD {100 * sd:.2g} pp"
    return (
        f"Hedges' g from {runs} with {spread} is not a meaningful effect size "
        f"({'; '.join(reasons)})"
    )


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------

COMPARE_COLUMNS: tuple[str, ...] = (
    "arm",
    "baseline",
    "n_replicates",
    "n_seeds",
    "n_examples",
    "arm_acc",
    "baseline_acc",
    *PAIRED_COLUMNS,
    "paired_p_holm",
    *BOOTSTRAP_COLUMNS,
    "p_improvement",
    "p_improvement_se",
    "p_improvement_ci_low",
    "p_improvement_ci_high",
    "hedges_g",
    "note",
)


def compare_to_baseline(
    data: PairedData,
    baseline: str,
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """One row per arm other than ``baseline``, in ``data``'s order, with columns
    :data:`COMPARE_COLUMNS`:

    - ``n_replicates``, ``n_seeds``, ``n_examples``: R, S, N; ``arm_acc``, ``baseline_acc``: mean
      test accuracy over the R·S runs;
    - ``paired_*``: :func:`paired_difference` (``paired_p`` is the raw p-value);
      ``paired_p_holm``: ``paired_p`` adjusted by :func:`holm` across the arms of this table;
    - ``boot_*``: :func:`bootstrap_difference` (every arm with the same ``seed``, so a row does
      not depend on which other arms are in the table);
    - ``p_improvement*``: :func:`probability_of_improvement` over the R·S run accuracies;
    - ``hedges_g`` (:func:`moe_lab.analysis.stats.hedges_g` of the run accuracies, unpaired) and
      ``note``: :func:`effect_size_note`, the paired test's note, and, with R = 1, that no
      interval contains the tuning's variance; joined with "; ".

    Raises:
        ValueError: ``baseline`` is not an arm of ``data``.
    """
    if baseline not in data.correct:
        raise ValueError(f"baseline {baseline!r} is not an arm; arms: {data.arms}")
    base = data.correct[baseline]
    base_acc = data.accuracies(baseline).ravel()
    rows = []
    for arm in data.arms:
        if arm == baseline:
            continue
        arm_acc = data.accuracies(arm).ravel()
        paired = paired_difference(data.correct[arm], base, confidence=confidence)
        notes = [effect_size_note(arm_acc, base_acc), paired.pop("paired_note")]
        paired.pop("paired_cell_diffs")
        if data.n_replicates == 1:
            notes.append("one tuning study per arm: no interval includes the tuning's variance")
        rows.append(
            {
                "arm": arm,
                "baseline": baseline,
                "n_replicates": data.n_replicates,
                "n_seeds": data.n_seeds,
                "n_examples": data.n_examples,
                "arm_acc": float(arm_acc.mean()),
                "baseline_acc": float(base_acc.mean()),
                **paired,
                **bootstrap_difference(
                    data.correct[arm], base, n_boot=n_boot, seed=seed, confidence=confidence
                ),
                **probability_of_improvement(
                    arm_acc, base_acc, n_boot=n_boot, seed=seed, confidence=confidence
                ),
                "hedges_g": hedges_g(arm_acc, base_acc),
                "note": "; ".join(note for note in notes if note),
            }
        )
    adjusted = holm({row["arm"]: row["paired_p"] for row in rows})
    for row in rows:
        row["paired_p_holm"] = adjusted[row["arm"]]
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))
