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
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from .bootstrap import (
    BOOTSTRAP_COLUMNS,
    bootstrap_difference,
    bootstrap_draws,
    probability_of_improvement,
)
from .paired_data import PairedData, check_confidence, pair_arrays, run_accuracies
from .stats import exact_samples_test, hedges_g, t_test_fields

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
    check_confidence(confidence)
    a, b = pair_arrays(arm, base)
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
    paired = exact_samples_test(stats.ttest_rel, acc_a.ravel(), acc_b.ravel())
    fields = t_test_fields(paired, confidence)
    names = {"t": "paired_t", "df": "paired_df", "p_value": "paired_p"}
    result.update({names.get(k, f"paired_{k}"): v for k, v in fields.items()})
    return result


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


# the table

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
