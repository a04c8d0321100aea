"""moe_lab.analysis against synthetic sweeps written in the run contract's exact on-disk format.

Every expected number is recomputed here from the raw per-run files (summary.json,
metrics.csv) with formulas written out (mean, sample std / sqrt(n), Welch's t and
Welch–Satterthwaite df, p from the t distribution's survival function, Hedges' g with the
Gamma-function correction), never through the module's own scipy calls.

The helpers ``make_sweep`` and friends are imported by tests/test_report.py too.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from moe_lab.analysis import (
    load_curves,
    load_expert_usage,
    load_runs,
    plot_curves,
    plot_expert_usage,
    summarize,
)

# ----------------------------------------------------------------------------------------------
# synthetic sweeps in the exact run-contract format (CONTRIBUTING.md)
# ----------------------------------------------------------------------------------------------

METRIC_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
GATE_LAYERS = ("features.conv1", "classifier.fc")


def write_run(
    run_dir: Path,
    *,
    model: str,
    data: str,
    seed: int,
    n_experts: int | None,
    status: str = "completed",
    val_accs: list[float] | None = None,
    test_acc: float | None = None,
    params: int = 1000,
    flops: int | None = 5000,
    wall_time_s: float = 10.0,
    error_type: str | None = None,
    error_message: str | None = None,
    diverged_at: dict[str, int] | None = None,
    top_k: int | None = None,
    rng: np.random.Generator | None = None,
    drop_fields: tuple[str, ...] = (),
    write_summary: bool = True,
) -> dict[str, Any]:
    """Write summary.json + metrics.csv (+ Hydra's .hydra/overrides.yaml) for one run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    val_accs = list(val_accs or [])
    rng = rng or np.random.default_rng(seed)
    overrides = [f"model={model}", f"data={data}", f"seed={seed}"]
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    header = list(METRIC_COLUMNS)
    if n_experts:
        for layer in GATE_LAYERS:
            header += [f"gate/{layer}/importance_{k}" for k in range(n_experts)]
            header += [f"gate/{layer}/load_{k}" for k in range(n_experts)]
            header.append(f"gate/{layer}/entropy")
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for epoch, val_acc in enumerate(val_accs):
            row = [epoch, (epoch + 1) * 125, 2.0 - 0.1 * epoch, val_acc - 0.01, 1.5, val_acc, 1e-4]
            if n_experts:
                for _ in GATE_LAYERS:
                    gates = rng.dirichlet(np.ones(n_experts))
                    row += [float(g) for g in gates] + [
                        float(g) for g in rng.dirichlet(np.ones(n_experts))
                    ]
                    row.append(float(-(gates * np.log(gates)).sum()))
            writer.writerow(row)
    summary: dict[str, Any] = {
        "experiment": "synthetic",
        "model": model,
        "data": data,
        "n_experts": n_experts,
        "top_k": top_k,
        "seed": seed,
        "params": params,
        "flops_per_example": flops,
        "width_multiplier": 1.0,
        "match_target": None,
        "status": status,
        "error_type": error_type,
        "error_message": error_message,
        "diverged_at": diverged_at,
        "epochs": len(val_accs),
        "max_epochs": 5,
        "val_acc_last": val_accs[-1] if val_accs else None,
        "val_acc_best": max(val_accs) if val_accs else None,
        "test_acc": test_acc,
        "wall_time_s": wall_time_s,
        "run_dir": f"/elsewhere/{run_dir.name}",
        "overrides": overrides,
    }
    for field in drop_fields:
        del summary[field]
    if write_summary:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _curve(rng: np.random.Generator, start: float, end: float, n_epochs: int) -> list[float]:
    base = np.linspace(start, end, n_epochs) + rng.normal(0, 0.01, n_epochs)
    base[-1] -= rng.uniform(0.0, 0.08)  # often past its best: best and last accuracy differ
    return [float(np.clip(v, 0.0, 1.0)) for v in base]


# (model, n_experts, mean test accuracy, params) of the mnist1d groups
MNIST1D_GROUPS = (
    ("cnn", None, 0.80, 1000),
    ("cnn_matched", None, 0.82, 2000),
    ("moe", 2, 0.86, 2100),
)
N_SEEDS = 4


def make_sweep(root: Path, *, with_bad_runs: bool = True, with_digits: bool = True) -> Path:
    """A sweep: mnist1d (3 groups x 4 seeds) [+ failed, diverged, partial, missing runs]
    [+ digits nested one level deeper: cnn and moe K=4, 3 seeds each, one without test acc]."""
    sweep = root / "sweep"
    rng = np.random.default_rng(1234)
    job = 0
    for model, n_experts, mean_acc, params in MNIST1D_GROUPS:
        for seed in range(N_SEEDS):
            test_acc = float(mean_acc + rng.normal(0, 0.015))
            write_run(
                sweep / f"{job}_model={model},seed={seed}",
                model=model,
                data="mnist1d",
                seed=seed,
                n_experts=n_experts,
                val_accs=_curve(rng, mean_acc - 0.3, mean_acc, 5),
                test_acc=test_acc,
                params=params,
                flops=params * 10,
                wall_time_s=float(rng.uniform(5, 15)),
                rng=rng,
            )
            job += 1
    if with_bad_runs:
        # Trap values: were these averaged in, the moe group's means would move a lot.
        write_run(
            sweep / f"{job}_model=moe,seed=4",
            model="moe",
            data="mnist1d",
            seed=4,
            n_experts=2,
            status="failed",
            val_accs=[0.99, 0.99],
            test_acc=0.99,
            params=2100,
            error_type="RuntimeError",
            error_message="CUDA out of memory | tried to allocate 2 GiB",
        )
        write_run(
            sweep / f"{job + 1}_model=moe,seed=5",
            model="moe",
            data="mnist1d",
            seed=5,
            n_experts=2,
            status="diverged",
            val_accs=[0.01, 0.01, 0.01],
            test_acc=None,
            params=2100,
            diverged_at={"epoch": 2, "step": 300},
        )
        write_run(
            sweep / f"{job + 2}_model=moe,seed=6",
            model="moe",
            data="mnist1d",
            seed=6,
            n_experts=2,
            val_accs=[0.98, 0.98],
            write_summary=False,
        )
        missing = sweep / f"{job + 3}_model=moe,seed=7"
        (missing / ".hydra").mkdir(parents=True)
        (missing / ".hydra" / "overrides.yaml").write_text(
            "- model=moe\n- data=mnist1d\n- seed=7\n"
        )
    if with_digits:
        for model, n_experts, mean_acc in (("cnn", None, 0.90), ("moe", 4, 0.93)):
            for seed in range(3):
                test_acc = (
                    None
                    if (model == "moe" and seed == 2)
                    else float(mean_acc + rng.normal(0, 0.01))
                )
                write_run(
                    sweep / "digits" / f"{model}_{seed}",
                    model=model,
                    data="digits",
                    seed=seed,
                    n_experts=n_experts,
                    val_accs=_curve(rng, mean_acc - 0.2, mean_acc, 3),
                    test_acc=test_acc,
                    params=500 if model == "cnn" else 900,
                    flops=None,
                    rng=rng,
                )
    return sweep


def raw_summaries(sweep: Path) -> list[dict[str, Any]]:
    """Every summary.json below ``sweep``, read straight from disk."""
    return [json.loads(p.read_text()) for p in sorted(sweep.rglob("summary.json"))]


def raw_group_values(
    sweep: Path, data: str, model: str, n_experts: int | None, field: str
) -> list[float]:
    """``field`` of the completed runs of one group, from the raw files."""
    return [
        s[field]
        for s in raw_summaries(sweep)
        if s["status"] == "completed"
        and s["data"] == data
        and s["model"] == model
        and s["n_experts"] == n_experts
        and s[field] is not None
    ]


def ref_mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and sqrt(sum((x - mean)^2) / (n - 1)) / sqrt(n), written out."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sample_std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sample_std / math.sqrt(n)


def ref_welch(a: list[float], b: list[float]) -> dict[str, float]:
    """Welch's t, Welch–Satterthwaite df, two-sided p from t.sf, 95% CI and Hedges' g, by formula."""
    n_a, n_b = len(a), len(b)
    m_a, m_b = sum(a) / n_a, sum(b) / n_b
    v_a = sum((x - m_a) ** 2 for x in a) / (n_a - 1)
    v_b = sum((x - m_b) ** 2 for x in b) / (n_b - 1)
    se2 = v_a / n_a + v_b / n_b
    t = (m_a - m_b) / math.sqrt(se2)
    df = se2**2 / ((v_a / n_a) ** 2 / (n_a - 1) + (v_b / n_b) ** 2 / (n_b - 1))
    p = 2 * stats.t.sf(abs(t), df)
    half_width = stats.t.ppf(0.975, df) * math.sqrt(se2)
    nu = n_a + n_b - 2
    pooled = math.sqrt(((n_a - 1) * v_a + (n_b - 1) * v_b) / nu)
    j = math.gamma(nu / 2) / (math.sqrt(nu / 2) * math.gamma((nu - 1) / 2))
    return {
        "diff": m_a - m_b,
        "t": t,
        "df": df,
        "p_value": p,
        "ci_low": m_a - m_b - half_width,
        "ci_high": m_a - m_b + half_width,
        "hedges_g": j * (m_a - m_b) / pooled,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)


def _load(sweep: Path) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid sweep must load without warnings
        return load_runs(sweep)


# ----------------------------------------------------------------------------------------------
# load_runs
# ----------------------------------------------------------------------------------------------


def test_load_runs_lists_every_job_dir_with_its_status(sweep: Path) -> None:
    runs = _load(sweep)
    job_dirs = sorted(p.parent for p in sweep.rglob(".hydra"))
    assert sorted(Path(d) for d in runs["run_dir"]) == job_dirs
    assert len(runs) == 3 * N_SEEDS + 4 + 6
    by_seed = runs[(runs["data"] == "mnist1d") & (runs["model"] == "moe")].set_index("seed")
    assert by_seed.loc[4, "status"] == "failed"
    assert (
        "RuntimeError" in by_seed.loc[4, "detail"] and "out of memory" in by_seed.loc[4, "detail"]
    )
    assert by_seed.loc[5, "status"] == "diverged"
    assert by_seed.loc[5, "detail"] == "diverged at epoch 2, step 300"
    assert by_seed.loc[6, "status"] == "partial"  # metrics.csv with 2 epochs, no summary.json
    assert by_seed.loc[6, "epochs"] == 2
    assert by_seed.loc[7, "status"] == "missing"  # only .hydra/: killed before its first epoch
    assert (runs["status"] == "completed").sum() == 3 * N_SEEDS + 6


def test_load_runs_copies_summary_fields_verbatim(sweep: Path) -> None:
    runs = _load(sweep).set_index("summary_path")
    for path in sweep.rglob("summary.json"):
        raw = json.loads(path.read_text())
        row = runs.loc[str(path.resolve())]
        for field in ("model", "data", "status", "experiment"):
            assert row[field] == raw[field]
        for field in (
            "seed",
            "params",
            "epochs",
            "val_acc_last",
            "val_acc_best",
            "test_acc",
            "wall_time_s",
        ):
            if raw[field] is None:
                assert pd.isna(row[field])
            else:
                assert row[field] == pytest.approx(raw[field], rel=0, abs=0)
        assert row["run_dir_recorded"] == raw["run_dir"]
        assert row["run_dir"] == str(path.parent.resolve())
        assert row["overrides"] == " ".join(raw["overrides"])


def test_summary_with_missing_fields_is_an_invalid_row_and_a_warning(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, with_bad_runs=False, with_digits=False)
    broken = sweep / "99_broken"
    write_run(
        broken,
        model="moe",
        data="mnist1d",
        seed=9,
        n_experts=2,
        val_accs=[0.5],
        test_acc=0.5,
        drop_fields=("test_acc", "wall_time_s"),
    )
    with pytest.warns(UserWarning, match=r"missing fields \['test_acc', 'wall_time_s'\]") as record:
        runs = load_runs(sweep)
    assert str(broken / "summary.json") in str(record[0].message)
    row = runs[runs["run_name"] == "99_broken"].iloc[0]
    assert row["status"] == "invalid"
    assert "missing fields ['test_acc', 'wall_time_s']" in row["detail"]
    assert str(broken / "summary.json") in row["detail"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected an object"),
    ],
)
def test_unreadable_summary_is_invalid(tmp_path: Path, text: str, message: str) -> None:
    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(text)
    with pytest.warns(UserWarning, match=message):
        runs = load_runs(tmp_path / "sweep")
    assert runs["status"].tolist() == ["invalid"]


def test_accuracy_in_percent_or_unknown_status_is_invalid(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_run(
        sweep / "0", model="cnn", data="d", seed=0, n_experts=None, val_accs=[0.5], test_acc=73.0
    )
    write_run(
        sweep / "1",
        model="cnn",
        data="d",
        seed=1,
        n_experts=None,
        val_accs=[0.5],
        test_acc=0.5,
        status="crashed",
    )
    with pytest.warns(UserWarning):
        runs = load_runs(sweep).set_index("run_name")
    assert runs.loc["0", "status"] == "invalid"
    assert "test_acc=73.0 outside [0, 1]" in runs.loc["0", "detail"]
    assert runs.loc["1", "status"] == "invalid"
    assert "status 'crashed'" in runs.loc["1", "detail"]


def test_interrupted_run_with_running_summary_is_partial(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_run(
        sweep / "0",
        model="cnn",
        data="d",
        seed=0,
        n_experts=None,
        val_accs=[0.4, 0.5],
        test_acc=None,
        status="running",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = load_runs(sweep).iloc[0]
    assert row["status"] == "partial" and row["epochs"] == 2
    assert "status 'running'" in row["detail"]


def test_job_dirs_nested_by_overrides_with_slashes_are_found(tmp_path: Path) -> None:
    # Hydra's override_dirname spells "paths.data_dir=/a/b" as nested dirs
    sweep = tmp_path / "sweep"
    deep = sweep / "0_paths.data_dir=" / "work" / "data,seed=0"
    write_run(deep, model="cnn", data="d", seed=0, n_experts=None, val_accs=[0.5], test_acc=0.5)
    (deep / "checkpoints").mkdir()
    (deep / "checkpoints" / ".hydra").mkdir()  # never searched: a job dir's insides are not jobs
    write_run(
        sweep / "1", model="cnn", data="d", seed=1, n_experts=None, val_accs=[0.5], test_acc=0.5
    )
    runs = load_runs(sweep)
    assert runs["run_name"].tolist() == ["0_paths.data_dir=/work/data,seed=0", "1"]


def test_load_runs_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        load_runs(tmp_path / "file.txt")
    (tmp_path / "empty" / "not_a_job").mkdir(parents=True)
    with pytest.raises(ValueError, match="no runs found"):
        load_runs(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# summarize: every number recomputed from the raw files
# ----------------------------------------------------------------------------------------------


def test_summarize_means_and_standard_errors_match_raw_files(sweep: Path) -> None:
    summary = summarize(_load(sweep)).set_index(["data", "group"])
    expected_groups = {
        ("mnist1d", "cnn"): ("cnn", None),
        ("mnist1d", "cnn_matched"): ("cnn_matched", None),
        ("mnist1d", "moe K=2"): ("moe", 2),
        ("digits", "cnn"): ("cnn", None),
        ("digits", "moe K=4"): ("moe", 4),
    }
    assert set(summary.index) == set(expected_groups)
    for (data, group), (model, k) in expected_groups.items():
        row = summary.loc[(data, group)]
        for field in ("val_acc_best", "val_acc_last", "test_acc", "wall_time_s"):
            values = raw_group_values(sweep, data, model, k, field)
            mean, se = ref_mean_se(values)
            if field == "wall_time_s":
                assert row["wall_time_s_mean"] == pytest.approx(mean, rel=1e-12)
                continue
            assert row[f"{field}_n"] == len(values)
            assert row[f"{field}_mean"] == pytest.approx(mean, rel=1e-12)
            assert row[f"{field}_se"] == pytest.approx(se, rel=1e-9)
        assert row["params"] == raw_group_values(sweep, data, model, k, "params")[0]
    assert summary.loc[("mnist1d", "moe K=2"), "n"] == N_SEEDS
    assert summary.loc[("mnist1d", "moe K=2"), "n_not_completed"] == 2  # failed + diverged
    assert summary.loc[("digits", "moe K=4"), "test_acc_n"] == 2  # one run without test accuracy
    assert pd.isna(summary.loc[("digits", "cnn"), "flops_per_example"])


def test_failed_and_diverged_runs_are_never_averaged_in(sweep: Path) -> None:
    summary = summarize(_load(sweep)).set_index(["data", "group"])
    completed_only = raw_group_values(sweep, "mnist1d", "moe", 2, "test_acc")
    everything = [
        s["test_acc"]
        for s in raw_summaries(sweep)
        if s["data"] == "mnist1d" and s["model"] == "moe" and s["test_acc"] is not None
    ]
    assert len(everything) == len(completed_only) + 1  # the failed run's trap value is on disk
    mean = summary.loc[("mnist1d", "moe K=2"), "test_acc_mean"]
    assert mean == pytest.approx(np.mean(completed_only), rel=1e-12)
    assert mean != pytest.approx(np.mean(everything), abs=1e-3)


def test_welch_test_and_hedges_g_against_formulas(sweep: Path) -> None:
    summary = summarize(_load(sweep)).set_index(["data", "group"])
    # mnist1d: baseline cnn_matched (default), metric test_acc (every completed run has one)
    base = raw_group_values(sweep, "mnist1d", "cnn_matched", None, "test_acc")
    for group, (model, k) in {"cnn": ("cnn", None), "moe K=2": ("moe", 2)}.items():
        row = summary.loc[("mnist1d", group)]
        assert row["baseline_group"] == "cnn_matched"
        assert row["metric"] == "test_acc"
        ref = ref_welch(raw_group_values(sweep, "mnist1d", model, k, "test_acc"), base)
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=1e-7), key
    assert summary.loc[("mnist1d", "cnn_matched"), "is_baseline"]
    assert pd.isna(summary.loc[("mnist1d", "cnn_matched"), "p_value"])
    # digits: no cnn_matched there -> cnn; a run lacks test_acc -> last validation accuracy
    row = summary.loc[("digits", "moe K=4")]
    assert row["baseline_group"] == "cnn" and row["metric"] == "val_acc_last"
    ref = ref_welch(
        raw_group_values(sweep, "digits", "moe", 4, "val_acc_last"),
        raw_group_values(sweep, "digits", "cnn", None, "val_acc_last"),
    )
    for key, value in ref.items():
        assert row[key] == pytest.approx(value, rel=1e-7), key


def test_explicit_baseline_and_unknown_baseline(sweep: Path) -> None:
    runs = _load(sweep)
    summary = summarize(runs, baseline="moe").set_index(["data", "group"])
    assert summary.loc[("mnist1d", "cnn"), "baseline_group"] == "moe K=2"
    assert summary.loc[("digits", "cnn"), "baseline_group"] == "moe K=4"
    ref = ref_welch(
        raw_group_values(sweep, "mnist1d", "cnn", None, "test_acc"),
        raw_group_values(sweep, "mnist1d", "moe", 2, "test_acc"),
    )
    assert summary.loc[("mnist1d", "cnn"), "p_value"] == pytest.approx(ref["p_value"], rel=1e-7)
    with pytest.raises(ValueError, match="baseline 'mlp' has no completed run"):
        summarize(runs, baseline="mlp")


def test_single_seed_groups_have_undefined_se_and_test(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_run(
        sweep / "0", model="cnn", data="d", seed=0, n_experts=None, val_accs=[0.5], test_acc=0.5
    )
    write_run(sweep / "1", model="moe", data="d", seed=0, n_experts=2, val_accs=[0.6], test_acc=0.6)
    summary = summarize(load_runs(sweep)).set_index("group")
    assert math.isnan(summary.loc["moe K=2", "test_acc_se"])
    assert math.isnan(summary.loc["moe K=2", "p_value"])
    assert "needs ≥ 2" in summary.loc["moe K=2", "note"]
    assert summary.loc["moe K=2", "diff"] == pytest.approx(0.1)


def test_a_swept_override_splits_groups_instead_of_pooling_as_seeds(tmp_path: Path) -> None:
    # Two learning rates x 2 seeds: four runs that used to be one group of n=4 with a warning.
    sweep = tmp_path / "sweep"
    accs = {("0.001", 0): 0.50, ("0.001", 1): 0.52, ("0.003", 0): 0.70, ("0.003", 1): 0.74}
    for job, ((lr, seed), acc) in enumerate(accs.items()):
        summary = write_run(
            sweep / str(job), model="cnn", data="d", seed=seed, n_experts=None,
            val_accs=[acc], test_acc=acc,
        )  # fmt: skip
        summary["overrides"] = [f"seed={seed}", f"optimizer.lr={'3e-3' if lr == '0.003' else lr}"]
        (sweep / str(job) / "summary.json").write_text(json.dumps(summary))
    summary = summarize(load_runs(sweep)).set_index("group")
    # 3e-3 and 0.003 are one value
    assert sorted(summary.index) == ["cnn optimizer.lr=0.001", "cnn optimizer.lr=0.003"]
    for lr in ("0.001", "0.003"):
        row = summary.loc[f"cnn optimizer.lr={lr}"]
        values = [acc for (lr_, _), acc in accs.items() if lr_ == lr]
        assert row["n"] == 2 and row["seeds"] == "0 1" and row["warning"] == ""
        assert row["test_acc_mean"] == pytest.approx(sum(values) / 2)


# ----------------------------------------------------------------------------------------------
# curves and figures
# ----------------------------------------------------------------------------------------------


def test_load_curves_is_long_format_of_completed_runs(sweep: Path) -> None:
    runs = _load(sweep)
    curves = load_curves(runs)
    assert set(curves["status"]) == {"completed"}
    for run_name, group_curves in curves.groupby("run_name"):
        raw = pd.read_csv(sweep / run_name / "metrics.csv")
        assert group_curves["epoch"].tolist() == raw["epoch"].tolist()
        assert group_curves["val_acc"].tolist() == raw["val_acc"].tolist()
    assert curves["run_name"].nunique() == 3 * N_SEEDS + 6


def test_plot_curves_draws_mean_and_se_of_raw_curves(sweep: Path, tmp_path: Path) -> None:
    curves = load_curves(_load(sweep))
    figure = plot_curves(curves, tmp_path / "c.png", title="t")
    axes = [a for a in figure.axes if a.get_title()]
    assert sorted(a.get_title() for a in axes) == ["data: digits", "data: mnist1d"]
    mnist = next(a for a in axes if a.get_title() == "data: mnist1d")
    assert mnist.get_xlabel() == "epoch" and mnist.get_ylabel() == "validation accuracy (%)"
    labels = [t.get_text() for t in mnist.get_legend().get_texts()]
    assert labels == ["cnn (n=4)", "cnn_matched (n=4)", "moe K=2 (n=4)"]
    moe_line = mnist.get_lines()[labels.index("moe K=2 (n=4)")]
    raw = [
        pd.read_csv(p.parent / "metrics.csv")["val_acc"].to_numpy()
        for p in sweep.glob("*/summary.json")
        if json.loads(p.read_text())["model"] == "moe"
        and json.loads(p.read_text())["status"] == "completed"
    ]
    assert len(raw) == N_SEEDS
    stacked = np.stack(raw)
    np.testing.assert_array_equal(moe_line.get_xdata(), np.arange(1, 6))  # 1-based epochs
    # drawn in %, as the tables show accuracies
    np.testing.assert_allclose(
        moe_line.get_ydata(), 100 * stacked.sum(axis=0) / N_SEEDS, rtol=1e-12
    )
    # the SE band's upper edge: mean + std(ddof=1)/sqrt(n)
    band = mnist.collections[labels.index("moe K=2 (n=4)")]
    upper = band.get_paths()[0].vertices[:, 1].max()
    se = np.sqrt(((stacked - stacked.mean(0)) ** 2).sum(0) / (N_SEEDS - 1)) / np.sqrt(N_SEEDS)
    assert upper == pytest.approx(100 * (stacked.mean(0) + se).max(), rel=1e-9)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expert_usage_tidy_frame_and_plot(sweep: Path) -> None:
    curves = load_curves(_load(sweep))
    usage = load_expert_usage(curves)
    assert set(usage["kind"]) == {"importance", "load", "entropy"}
    assert set(usage["layer"]) == set(GATE_LAYERS)
    assert set(usage["group"]) == {"moe K=2", "moe K=4"}  # plain CNNs log no gates
    run_name = "8_model=moe,seed=0"
    raw = pd.read_csv(sweep / run_name / "metrics.csv")
    cell = usage[
        (usage["run_name"] == run_name)
        & (usage["epoch"] == 3)
        & (usage["layer"] == "classifier.fc")
        & (usage["kind"] == "importance")
        & (usage["expert"] == 1)
    ]
    assert cell["value"].tolist() == [raw.loc[3, "gate/classifier.fc/importance_1"]]
    entropy = usage[
        (usage["run_name"] == run_name)
        & (usage["kind"] == "entropy")
        & (usage["layer"] == "features.conv1")
    ]
    assert entropy["value"].tolist() == raw["gate/features.conv1/entropy"].tolist()
    assert entropy["expert"].isna().all()

    figure = plot_expert_usage(usage)
    assert len(figure.axes) == 2 * 2  # 2 MoE groups x (bars, entropy)
    bars_axis = figure.axes[2]  # sorted (data, group): (digits, moe K=4), (mnist1d, moe K=2)
    assert bars_axis.get_title() == "mnist1d: moe K=2 (n=4)"
    # bar of expert 0 in layer classifier.fc (sorted first) = mean over runs at their last epoch
    last_values = [
        pd.read_csv(p.parent / "metrics.csv")["gate/classifier.fc/importance_0"].iloc[-1]
        for p in sweep.glob("*/summary.json")
        if json.loads(p.read_text())["model"] == "moe"
        and json.loads(p.read_text())["status"] == "completed"
    ]
    first_bar = bars_axis.patches[0]
    assert first_bar.get_height() == pytest.approx(sum(last_values) / len(last_values), rel=1e-12)
    with pytest.raises(ValueError, match="only MoE runs log expert usage"):
        plot_expert_usage(usage[usage["kind"] == "entropy"])


def test_top_k_splits_groups_and_baseline_is_matched_by_k(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(7)
    specs = [
        ("cnn_matched", 2, None, 0.80),
        ("cnn_matched", 4, None, 0.81),
        ("moe", 2, None, 0.83),
        ("moe", 4, 1, 0.84),
        ("moe", 4, 2, 0.85),
    ]
    for i, (model, k, top_k, acc) in enumerate(specs):
        for seed in range(3):
            write_run(
                sweep / f"{i}_{seed}",
                model=model,
                data="d",
                seed=seed,
                n_experts=k,
                top_k=top_k,
                val_accs=[acc],
                test_acc=float(acc + rng.normal(0, 0.01)),
                rng=rng,
            )
    runs = load_runs(sweep)
    summary = summarize(runs).set_index("group")
    assert sorted(summary.index) == [
        "cnn_matched K=2",
        "cnn_matched K=4",
        "moe K=2",
        "moe K=4 top-1",
        "moe K=4 top-2",
    ]
    assert summary.loc["moe K=2", "baseline_group"] == "cnn_matched K=2"
    assert summary.loc["moe K=4 top-1", "baseline_group"] == "cnn_matched K=4"
    assert summary.loc["moe K=4 top-2", "baseline_group"] == "cnn_matched K=4"

    def values(model: str, k: int, top_k: int | None) -> list[float]:
        return [
            s["test_acc"]
            for s in raw_summaries(sweep)
            if (s["model"], s["n_experts"], s["top_k"]) == (model, k, top_k)
        ]

    ref = ref_welch(values("moe", 2, None), values("cnn_matched", 2, None))
    assert summary.loc["moe K=2", "p_value"] == pytest.approx(ref["p_value"], rel=1e-7)
    ref = ref_welch(values("moe", 4, 2), values("cnn_matched", 4, None))
    assert summary.loc["moe K=4 top-2", "p_value"] == pytest.approx(ref["p_value"], rel=1e-7)

    # two baseline groups and a compared group whose K matches neither: reported, not guessed
    for seed in range(2):
        write_run(
            sweep / f"9_{seed}",
            model="moe",
            data="d",
            seed=seed,
            n_experts=8,
            val_accs=[0.9],
            test_acc=0.9,
        )
    row = summarize(load_runs(sweep)).set_index("group").loc["moe K=8"]
    assert pd.isna(row["p_value"]) and "ambiguous baseline" in row["note"]


def test_sweep_of_only_invalid_summaries_gives_empty_summary(tmp_path: Path) -> None:
    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    with pytest.warns(UserWarning, match="missing fields"):
        runs = load_runs(tmp_path / "sweep")
    summary = summarize(runs)
    assert summary.empty and "test_acc_mean" in summary.columns
