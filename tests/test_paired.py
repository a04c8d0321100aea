"""moe_lab.analysis.paired against brute force: every bootstrap is checked against the exact
distribution from enumerating every resample, or an analytic variance; the tests against
scipy/statsmodels recompute the statistic by hand as well."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moe_lab.analysis.paired import (
    COMPARE_COLUMNS,
    PairedData,
    bootstrap_difference,
    bootstrap_draws,
    compare_to_baseline,
    effect_size_note,
    holm,
    paired_difference,
    probability_of_improvement,
    run_accuracies,
)

# ----------------------------------------------------------------------------------------------
# the hierarchical bootstrap against exact enumeration
# ----------------------------------------------------------------------------------------------

# Replicate 0 is the better tuning study and seed 0 the better seed in BOTH arms, and example 1 is
# the easy one in both: a scheme that paired the replicates, or did not share the seeds or the
# examples between the arms, gives a different distribution.
ARM_R2 = np.array(
    [
        [[1, 1, 1], [1, 1, 0]],  # replicate 0: seed 0, seed 1
        [[1, 1, 0], [0, 1, 0]],  # replicate 1
    ]
)
BASE_R2 = np.array(
    [
        [[1, 1, 0], [0, 1, 0]],
        [[0, 1, 0], [0, 1, 1]],
    ]
)


def _exact_bootstrap(arm: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Δ* for every equally likely resample (replicates per arm, seeds per replicate slot shared,
    examples shared), enumerated with itertools.product: the exact bootstrap distribution."""
    n_rep, n_seeds, n_ex = arm.shape
    draws = []
    for rep_a in itertools.product(range(n_rep), repeat=n_rep):
        for rep_b in itertools.product(range(n_rep), repeat=n_rep):
            for seeds in itertools.product(range(n_seeds), repeat=n_rep * n_seeds):
                sigma = np.reshape(seeds, (n_rep, n_seeds))
                # cells (slot k, draw m) -> (N,) rows of each arm
                rows_a = arm[np.array(rep_a)[:, None], sigma].reshape(-1, n_ex)
                rows_b = base[np.array(rep_b)[:, None], sigma].reshape(-1, n_ex)
                for examples in itertools.product(range(n_ex), repeat=n_ex):
                    index = list(examples)
                    draws.append(rows_a[:, index].mean() - rows_b[:, index].mean())
    return np.array(draws)


@pytest.mark.parametrize(
    "arm, base",
    [(ARM_R2, BASE_R2), (ARM_R2[:1], BASE_R2[:1])],
    ids=["R2_S2_N3", "R1_S2_N3"],
)
def test_bootstrap_matches_exact_enumeration(arm: np.ndarray, base: np.ndarray) -> None:
    exact = _exact_bootstrap(arm, base)
    assert exact.size == (arm.shape[0] ** arm.shape[0]) ** 2 * 2 ** (2 * arm.shape[0]) * 27
    n_boot = 20_000
    draws = bootstrap_draws(arm, base, n_boot=n_boot, seed=1)
    exact_sd = exact.std()
    assert abs(draws.mean() - exact.mean()) < 4 * exact_sd / math.sqrt(n_boot)
    assert draws.std(ddof=1) == pytest.approx(exact_sd, rel=0.03)
    # the whole distribution: the empirical CDF at every atom (KS bound, 99.9%: 1.95/sqrt(n))
    atoms = np.unique(exact.round(9))  # the same value, rounded differently by each sum
    cdf_exact = (exact[:, None] <= atoms + 1e-9).mean(axis=0)
    cdf_mc = (draws[:, None] <= atoms + 1e-9).mean(axis=0)
    assert np.abs(cdf_mc - cdf_exact).max() < 1.95 / math.sqrt(n_boot)
    # the interval's ends: between the exact quantiles at 2.5% ± 1% (97.5% ± 1%)
    result = bootstrap_difference(arm, base, n_boot=n_boot, seed=1)
    for level, end in ((0.025, "boot_ci_low"), (0.975, "boot_ci_high")):
        low, high = np.quantile(exact, [level - 0.01, level + 0.01])
        assert low - 1e-12 <= result[end] <= high + 1e-12
    assert result["boot_diff"] == pytest.approx(arm.mean() - base.mean())
    assert result["boot_se"] == pytest.approx(draws.std(ddof=1))


def test_bootstrap_se_matches_example_variance_with_one_seed() -> None:
    """R = S = 1: only examples are resampled, so SE(Δ*) = sqrt(var(d_i) / N), d_i = a_i − b_i
    (plug-in variance, ddof 0)."""
    rng = np.random.default_rng(3)
    n_ex = 2000
    base = rng.random(n_ex) < 0.7
    arm = base.copy()
    flip = rng.random(n_ex) < 0.15
    arm[flip] = rng.random(flip.sum()) < 0.8  # differ only on some examples
    d = arm.astype(float) - base
    expected = math.sqrt(d.var() / n_ex)
    result = bootstrap_difference(arm[None, None], base[None, None], n_boot=20_000, seed=0)
    assert result["boot_se"] == pytest.approx(expected, rel=0.05)
    assert result["boot_diff"] == pytest.approx(d.mean())
    # the percentile interval of a near-normal statistic ≈ diff ± 1.96 SE
    assert result["boot_ci_low"] == pytest.approx(d.mean() - 1.96 * expected, abs=0.25 * expected)
    assert result["boot_ci_high"] == pytest.approx(d.mean() + 1.96 * expected, abs=0.25 * expected)


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    arm, base = ARM_R2, BASE_R2
    first = bootstrap_draws(arm, base, n_boot=300, seed=7)
    np.testing.assert_array_equal(first, bootstrap_draws(arm, base, n_boot=300, seed=7))
    assert not np.array_equal(first, bootstrap_draws(arm, base, n_boot=300, seed=8))


def _seed_shift_design(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """S = 10 seeds, each adding the same big shift (±25 pp) to both arms' accuracy."""
    n_seeds, n_ex = 10, 200
    shift = rng.choice([-0.25, 0.25], size=n_seeds)
    p_arm = 0.6 + 0.03 + shift[:, None]
    p_base = 0.6 + shift[:, None]
    arm = rng.random((n_seeds, n_ex)) < p_arm
    base = rng.random((n_seeds, n_ex)) < p_base
    return arm[None], base[None]


def test_pairing_over_seeds_narrows_the_interval() -> None:
    """A seed effect shared by both arms cancels in the paired bootstrap; resampling the seeds
    independently per arm (computed here by hand, on the run accuracies) keeps it."""
    rng = np.random.default_rng(11)
    arm, base = _seed_shift_design(rng)
    paired = bootstrap_difference(arm, base, n_boot=4000, seed=0)
    acc_arm, acc_base = arm[0].mean(axis=1), base[0].mean(axis=1)
    n_seeds = acc_arm.size
    pick_a = rng.integers(0, n_seeds, size=(4000, n_seeds))
    pick_b = rng.integers(0, n_seeds, size=(4000, n_seeds))
    unpaired = acc_arm[pick_a].mean(axis=1) - acc_base[pick_b].mean(axis=1)
    unpaired_low, unpaired_high = np.quantile(unpaired, [0.025, 0.975])
    paired_width = paired["boot_ci_high"] - paired["boot_ci_low"]
    assert paired_width < 0.4 * (unpaired_high - unpaired_low)
    assert paired["boot_se"] < 0.4 * unpaired.std(ddof=1)
    # the paired t-test sees the same: its interval is narrower than Welch's
    welch = stats.ttest_ind(acc_arm, acc_base, equal_var=False).confidence_interval()
    t_test = paired_difference(arm, base)
    assert t_test["paired_ci_high"] - t_test["paired_ci_low"] < 0.4 * (welch.high - welch.low)


# ----------------------------------------------------------------------------------------------
# paired t-test
# ----------------------------------------------------------------------------------------------


def test_paired_t_matches_ttest_rel_on_run_accuracies() -> None:
    rng = np.random.default_rng(5)
    arm = rng.random((2, 4, 50)) < 0.75
    base = rng.random((2, 4, 50)) < 0.7
    acc_a, acc_b = arm.mean(axis=2).ravel(), base.mean(axis=2).ravel()
    expected = stats.ttest_rel(acc_a, acc_b)
    result = paired_difference(arm, base, confidence=0.9)
    assert result["paired_t"] == pytest.approx(expected.statistic)
    assert result["paired_p"] == pytest.approx(expected.pvalue)
    assert result["paired_df"] == 7 == result["paired_n"] - 1
    # by hand: mean ± t_{0.95, 7} · sd / sqrt(8)
    d = acc_a - acc_b
    half = stats.t.ppf(0.95, 7) * d.std(ddof=1) / math.sqrt(8)
    assert result["paired_diff"] == pytest.approx(d.mean())
    assert result["paired_sd"] == pytest.approx(d.std(ddof=1))
    assert result["paired_ci_low"] == pytest.approx(d.mean() - half)
    assert result["paired_ci_high"] == pytest.approx(d.mean() + half)
    np.testing.assert_allclose(result["paired_cell_diffs"], d.reshape(2, 4))
    assert result["paired_note"] == ""


def test_paired_t_undefined_cases_say_why() -> None:
    one_cell = paired_difference(np.ones((1, 1, 4)), np.zeros((1, 1, 4)))
    assert one_cell["paired_diff"] == 1.0
    assert (
        math.isnan(one_cell["paired_p"]) and "one (replicate, seed) cell" in one_cell["paired_note"]
    )
    same = paired_difference(np.ones((1, 3, 4)), np.zeros((1, 3, 4)))
    assert math.isnan(same["paired_t"]) and "undefined" in same["paired_note"]


# ----------------------------------------------------------------------------------------------
# probability of improvement
# ----------------------------------------------------------------------------------------------


def test_probability_of_improvement_matches_double_loop_and_mann_whitney() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(14, 20, size=9) / 20  # coarse scores: many ties
    b = rng.integers(12, 19, size=7) / 20
    wins = 0.0
    for x in a:
        for y in b:
            wins += 1.0 if x > y else 0.5 if x == y else 0.0
    expected = wins / (a.size * b.size)
    result = probability_of_improvement(a, b, n_boot=2000)
    assert result["p_improvement"] == pytest.approx(expected)
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    assert result["p_improvement"] == pytest.approx(u / (a.size * b.size))
    assert result["p_improvement_ci_low"] <= expected <= result["p_improvement_ci_high"]
    assert (result["p_improvement_n_arm"], result["p_improvement_n_base"]) == (9, 7)
    assert probability_of_improvement(b, a, n_boot=2)["p_improvement"] == pytest.approx(
        1 - expected
    )


def test_probability_of_improvement_bootstrap_matches_enumeration() -> None:
    """Resampling runs of each arm: 3³ · 2² equally likely resamples, enumerated."""
    a, b = np.array([0.80, 0.70, 0.75]), np.array([0.72, 0.75])
    exact = []
    for ia in itertools.product(range(3), repeat=3):
        for ib in itertools.product(range(2), repeat=2):
            x, y = a[list(ia)], b[list(ib)]
            exact.append(((x[:, None] > y) + 0.5 * (x[:, None] == y)).mean())
    exact = np.array(exact)
    result = probability_of_improvement(a, b, n_boot=20_000, seed=4)
    assert result["p_improvement_se"] == pytest.approx(exact.std(), rel=0.03)
    low, high = np.quantile(exact, [0.015, 0.035])
    assert low <= result["p_improvement_ci_low"] <= high


# ----------------------------------------------------------------------------------------------
# Holm
# ----------------------------------------------------------------------------------------------


def test_holm_hand_case() -> None:
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert list(adjusted) == ["a", "b", "c"]
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    # capped at 1, and the running max: b's 2 · 0.5 = 1.0 beats c's 1 · 0.7
    assert holm({"a": 0.6, "b": 0.5, "c": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    assert holm({"a": 0.002, "b": 0.5, "c": 0.7}) == pytest.approx({"a": 0.006, "b": 1.0, "c": 1.0})
    assert holm({}) == {}


def test_holm_nan_passes_through_and_does_not_count() -> None:
    adjusted = holm({"a": 0.01, "b": math.nan, "c": 0.04})
    assert math.isnan(adjusted["b"])
    assert adjusted["a"] == pytest.approx(0.02) and adjusted["c"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm({"a": 1.2})


def test_holm_is_monotone_and_at_least_the_raw_p() -> None:
    rng = np.random.default_rng(0)
    raw = {f"arm{i}": float(p) for i, p in enumerate(rng.random(12) ** 3)}
    raw["tie"] = raw["arm3"]
    adjusted = holm(raw)
    order = sorted(raw, key=raw.get)
    values = [adjusted[key] for key in order]
    assert values == sorted(values)
    assert all(raw[k] <= adjusted[k] <= 1 for k in raw)
    assert adjusted["tie"] == adjusted["arm3"]


def test_holm_matches_statsmodels() -> None:
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(1)
    raw = rng.random(9) ** 2
    raw[4] = raw[2]
    expected = multitest.multipletests(raw, method="holm")[1]
    adjusted = holm({str(i): p for i, p in enumerate(raw)})
    np.testing.assert_allclose([adjusted[str(i)] for i in range(9)], expected)


# ----------------------------------------------------------------------------------------------
# effect-size note
# ----------------------------------------------------------------------------------------------


def test_effect_size_note() -> None:
    note = effect_size_note([0.90, 0.91, 0.905], [0.89, 0.90, 0.9])
    assert note.startswith("Hedges' g from n=3 per arm with pooled SD 0.54 pp is not a meaningful")
    assert "fewer than 5 runs per arm" in note and "below" not in note
    flat = effect_size_note([0.9, 0.9001] * 3, [0.8999, 0.9] * 3)
    assert "pooled SD below 0.1 pp" in flat and "n=6 per arm" in flat
    assert "fewer than" not in flat
    rng = np.random.default_rng(0)
    assert (
        effect_size_note(0.9 + 0.01 * rng.standard_normal(6), 0.9 + 0.01 * rng.standard_normal(5))
        == ""
    )
    assert "undefined SD" in effect_size_note([0.9], [0.8])


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------


def _data(rng: np.random.Generator, shape: tuple[int, int, int] = (2, 3, 40)) -> PairedData:
    return PairedData(
        {
            "cnn": rng.random(shape) < 0.70,
            "moe": rng.random(shape) < 0.80,
            "moe_top1": rng.random(shape) < 0.72,
            "moe_wide": rng.random(shape) < 0.90,
        }
    )


def test_compare_to_baseline_columns_and_holm() -> None:
    data = _data(np.random.default_rng(9))
    table = compare_to_baseline(data, "cnn", n_boot=500, seed=3)
    assert list(table.columns) == list(COMPARE_COLUMNS)
    assert table["arm"].tolist() == ["moe", "moe_top1", "moe_wide"]
    assert (table["baseline"] == "cnn").all()
    assert table[["n_replicates", "n_seeds", "n_examples"]].iloc[0].tolist() == [2, 3, 40]
    expected = holm(dict(zip(table["arm"], table["paired_p"], strict=True)))
    np.testing.assert_allclose(table["paired_p_holm"], [expected[a] for a in table["arm"]])
    assert (table["paired_p_holm"] >= table["paired_p"]).all()
    assert (table["paired_p_holm"] > table["paired_p"]).any()  # m = 3: the correction bites
    row = table.set_index("arm").loc["moe_wide"]
    base = data.correct["cnn"]
    alone = paired_difference(data.correct["moe_wide"], base)
    assert row["paired_p"] == pytest.approx(alone["paired_p"])
    boot = bootstrap_difference(data.correct["moe_wide"], base, n_boot=500, seed=3)
    assert row["boot_ci_low"] == pytest.approx(boot["boot_ci_low"])
    assert row["boot_se"] == pytest.approx(boot["boot_se"])
    accuracies = run_accuracies(data.correct["moe_wide"]).ravel()
    assert row["arm_acc"] == pytest.approx(accuracies.mean())
    pi = probability_of_improvement(accuracies, data.accuracies("cnn").ravel(), n_boot=500, seed=3)
    assert row["p_improvement"] == pytest.approx(pi["p_improvement"])
    # the notes: 6 runs per arm but clearly spread: no effect-size note; R = 2: no tuning note
    assert row["note"] == ""
    one_study = compare_to_baseline(_data(np.random.default_rng(0), (1, 3, 40)), "cnn", n_boot=50)
    assert one_study["note"].str.contains("n=3 per arm").all()
    assert one_study["note"].str.contains("one tuning study").all()


def test_compare_to_baseline_errors_name_the_arm_and_shapes() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"'dense' is not an arm; arms: \['cnn', 'moe'"):
        compare_to_baseline(_data(rng), "dense")
    with pytest.raises(ValueError) as info:
        PairedData({"cnn": np.ones((1, 3, 50)), "moe_wide": np.ones((1, 3, 40))})
    message = str(info.value)
    assert "'moe_wide'" in message and "(1, 3, 40)" in message and "(1, 3, 50)" in message
    assert "examples N: 40 vs 50" in message
    with pytest.raises(ValueError, match=r"'moe'.*seeds S: 2 vs 3"):
        PairedData({"cnn": np.ones((1, 3, 5)), "moe": np.ones((1, 2, 5))})
    with pytest.raises(ValueError, match=r"'moe'.*shape \(2, 5\)"):
        PairedData({"moe": np.ones((2, 5))})
    with pytest.raises(ValueError, match=r"'moe'.*0/1"):
        PairedData({"moe": np.full((1, 2, 5), 0.5)})
    with pytest.raises(ValueError, match="shape"):
        bootstrap_difference(np.ones((1, 2, 5)), np.ones((1, 2, 6)))


def test_from_predictions() -> None:
    labels = np.array([0, 1, 2, 1])
    predictions = {"cnn": np.array([[[0, 1, 0, 1]]]), "moe": np.array([[[0, 1, 2, 2]]])}
    data = PairedData.from_predictions(predictions, labels)
    np.testing.assert_array_equal(data.correct["cnn"], [[[1, 1, 0, 1]]])
    assert data.accuracies("moe").tolist() == [[0.75]]
    assert isinstance(compare_to_baseline(data, "cnn", n_boot=10), pd.DataFrame)
    with pytest.raises(ValueError, match=r"'moe'.*N=4"):
        PairedData.from_predictions({"moe": np.zeros((1, 1, 3))}, labels)
