"""A verdict that survives review, on a tiny real comparison: the preset's four arms (both matched
baselines), two tuning replicates, predictions kept by every final run; every paired statistic
of the report recomputed here from the raw per-run files (predictions.npz, summary.json,
study.db), the batch size recorded and kept, and the README's result block rendered from it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats

from conftest import cli_env, run_module
from moe_lab.analysis.bootstrap import bootstrap_difference
from test_compare import _comparison_dir, _env, _paths, kill_when

ARMS = ["cnn", "moe", "cnn_flop_matched", "cnn_matched"]
TINY4 = [
    "experiment=digits",  # no compare.arms: the preset's arms
    "compare.trials=2",
    "compare.seeds=2",
    "compare.replicates=2",
    "compare.sampler=random",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "logger=csv",
]


@pytest.fixture(scope="module")
def four(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("verdict")
    proc = run_module("moe_lab.compare", *TINY4, *_paths(root), cwd=root, timeout=900, **_env(root))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return root, _comparison_dir(root), proc


def _summary(comparison: Path) -> pd.DataFrame:
    return pd.read_csv(comparison / "summary.csv").set_index("arm")


def _correct(comparison: Path, arm: str) -> np.ndarray:
    """correct[r, j, i] from the final runs' own predictions.npz files."""
    record = json.loads((comparison / "comparison.json").read_text())
    seeds = record["settings"]["final_seeds"]
    cells = []
    for r in range(2):
        row = []
        for seed in seeds[2 * r : 2 * r + 2]:
            with np.load(
                comparison / "final" / arm / f"r{r}" / f"seed_{seed}" / "predictions.npz"
            ) as f:
                row.append(f["pred"] == f["label"])
        cells.append(row)
    return np.array(cells)


def test_the_default_arms_are_both_matched_baselines(four) -> None:
    _, comparison, _ = four
    summary = _summary(comparison)
    assert list(summary.index) == ARMS
    assert summary.loc["moe", "baseline"] == "cnn_matched"
    # the matched CNNs match the MoE on their own axis (within the matching's tolerance)
    moe = summary.loc["moe"]
    assert abs(summary.loc["cnn_matched", "params"] / moe["params"] - 1) < 0.03
    ratio = summary.loc["cnn_flop_matched", "flops_per_example"] / moe["flops_per_example"]
    assert abs(ratio - 1) < 0.03
    report = (comparison / "report.md").read_text()
    assert "| arm | params | FLOPs / example |" in report
    # every verdict names the axis it compares on
    verdicts = [line for line in report.splitlines() if line.startswith("- ") and " vs " in line]
    moe_verdict = next(v for v in verdicts if v.startswith("- moe K=2 vs cnn_matched"))
    assert "same params)" in moe_verdict and "× FLOPs" in moe_verdict
    flop = next(v for v in verdicts if v.startswith("- cnn_flop_matched"))
    assert "× params)" in flop
    # and the MoE against each matched baseline: the same FLOPs, then the same params
    section = report.split("## Against each matched baseline")[1].split("\n## ")[0]
    against_flops = next(
        v for v in section.splitlines() if v.startswith("- moe K=2 vs cnn_flop_matched")
    )
    assert "(same FLOPs, " in against_flops and "× params)" in against_flops
    assert sum(line.startswith("- ") for line in section.splitlines()) == 4  # cnn, moe x 2


def test_replicates_give_two_studies_per_arm_with_disjoint_seeds(four) -> None:
    _, comparison, _ = four
    storage = f"sqlite:///{comparison / 'study.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage=storage)}
    assert names == {*ARMS, *(f"{arm}@r1" for arm in ARMS)}
    tune_seeds, final_seeds = set(), set()
    for arm in ARMS:
        for r, name in enumerate((arm, f"{arm}@r1")):
            trials = optuna.load_study(study_name=name, storage=storage).get_trials()
            assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
            seeds = [t.user_attrs["proposal"]["seed"] for t in trials]
            assert seeds == [2 * r, 2 * r + 1]  # trial i of replicate r: seed r·trials + i
            tune_seeds |= set(seeds)
            for t in trials:
                run_dir = comparison / t.user_attrs["proposal"]["run_dir"]
                assert run_dir.parent.name == f"r{r}"
                assert json.loads((run_dir / "summary.json").read_text())["replicate"] == r
        finals = sorted(
            p.parent for p in (comparison / "final" / arm).glob("r*/seed_*/summary.json")
        )
        assert len(finals) == 4
        final_seeds |= {json.loads((p / "summary.json").read_text())["seed"] for p in finals}
    assert tune_seeds == {0, 1, 2, 3} and final_seeds == {1000, 1001, 1002, 1003}
    summary = _summary(comparison)
    assert (summary["final_n"] == 4).all() and (summary["trials_completed"] == 4).all()
    assert (summary["trials_random"] == 4).all()  # compare.sampler=random: none guided
    assert (
        "## Replicates: 2 independent tuning studies per arm"
        in (comparison / "report.md").read_text()
    )
    best = json.loads((comparison / "best_params.json").read_text())
    assert set(best) == {*ARMS, *(f"{arm}@r1" for arm in ARMS)}


def test_paired_statistics_match_the_raw_files(four) -> None:
    _, comparison, _ = four
    summary = _summary(comparison)
    base = _correct(comparison, "cnn_matched")
    raw_p = {}
    for arm in ("cnn", "moe", "cnn_flop_matched"):
        mine = _correct(comparison, arm)
        acc_a, acc_b = mine.mean(axis=2), base.mean(axis=2)
        row = summary.loc[arm]
        assert row["paired_diff"] == pytest.approx((acc_a - acc_b).mean())
        test = stats.ttest_rel(acc_a.ravel(), acc_b.ravel())
        if np.isfinite(test.pvalue):
            assert row["paired_p"] == pytest.approx(test.pvalue)
        raw_p[arm] = test.pvalue
        boot = bootstrap_difference(mine, base, n_boot=10_000, seed=0)
        assert row["boot_ci_low"] == pytest.approx(boot["boot_ci_low"])
        assert row["boot_ci_high"] == pytest.approx(boot["boot_ci_high"])
        assert row["boot_ci_low"] <= row["paired_diff"] <= row["boot_ci_high"]
        wins = [(a > b) + 0.5 * (a == b) for a in acc_a.ravel() for b in acc_b.ravel()]
        assert row["p_improvement"] == pytest.approx(np.mean(wins))
        # the run's own test accuracy is its predictions' accuracy
        assert row["test_acc_mean"] == pytest.approx(acc_a.mean(), abs=1e-6)
    # Holm over the three arms compared with the baseline, by hand
    finite = sorted((p, arm) for arm, p in raw_p.items() if np.isfinite(p))
    running = 0.0
    for k, (p, arm) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - k) * p))
        assert summary.loc[arm, "paired_p_holm"] == pytest.approx(running)


def test_the_why_columns_match_the_runs_metrics(four) -> None:
    """Fit (train vs validation at the last epoch), activation scales at init and at the end, and
    the MoE layers' routing over training, recomputed from the final runs' metrics.csv."""
    _, comparison, _ = four
    summary = _summary(comparison)
    report = (comparison / "report.md").read_text()
    assert "## Why: fit, activation scale and routing (final runs)" in report
    assert (comparison / "accuracy_vs_flops.png").is_file()
    assert "(accuracy_vs_flops.png)" in report
    for arm in ARMS:
        metrics = [
            pd.read_csv(p)
            for p in sorted((comparison / "final" / arm).glob("r*/seed_*/metrics.csv"))
        ]
        assert len(metrics) == 4
        last = [m.iloc[-1] for m in metrics]
        train = np.mean([r["train_acc"] for r in last])
        val = np.mean([r["val_acc"] for r in last])
        assert summary.loc[arm, "why_train_acc"] == pytest.approx(train)
        assert summary.loc[arm, "why_fit_gap"] == pytest.approx(train - val)
        # every layer's scale before training is in the first row; conv and dense layers alike
        init_columns = [
            c for c in metrics[0].columns if c.startswith("act/") and c.endswith("/std_init")
        ]
        assert len(init_columns) >= 3 and all(metrics[0][init_columns].iloc[0] > 0)
        similarity = [
            c for c in metrics[0].columns if c.startswith("gate/") and c.endswith("/similarity")
        ]
        if arm == "moe":
            expected = np.mean([np.mean([r[c] for c in similarity]) for r in last])
            assert summary.loc[arm, "why_similarity_last"] == pytest.approx(expected)
            entropy = [
                c for c in metrics[0].columns if c.startswith("gate/") and c.endswith("/entropy")
            ]
            first = np.mean([np.mean([m.iloc[0][c] for c in entropy]) for m in metrics])
            assert summary.loc[arm, "why_entropy_first"] == pytest.approx(first)
        else:  # a CNN has no experts
            assert not similarity and np.isnan(summary.loc[arm, "why_similarity_last"])


def test_the_results_block_renders_from_the_comparison(four, capsys) -> None:
    from moe_lab.results import main as results_main

    root, comparison, _ = four
    assert results_main([str(comparison), "--relative-to", str(root)]) == 0
    block = capsys.readouterr().out
    summary = _summary(comparison)
    for arm in ARMS:
        row = summary.loc[arm]
        mean, se = 100 * row["test_acc_mean"], 100 * row["test_acc_se"]
        assert f"{mean:.2f} ± {se:.2f} (n=4)" in block
    moe = summary.loc["moe"]
    assert f"{100 * moe['paired_diff']:+.2f}".replace("-", "−") in block
    assert "Budget: 2 trials × 1 epochs per arm and replicate (2 replicates)" in block
    assert "Command: `python -m moe_lab.compare experiment=digits" in block
    assert "Commit of the runs: `" in block and "(set-up and report excluded)" in block
    assert "evp.png)" in block and "accuracy_vs_flops.png)" in block
    # the heading names the preset and the overrides that tell this comparison from another
    heading = next(line for line in block.splitlines() if line.startswith("#### "))
    assert heading.startswith("#### digits (") and "compare.replicates=2" in heading
    figures = root / "figures"
    assert (
        results_main([str(comparison), "--relative-to", str(root), "--figures", str(figures)]) == 0
    )
    out = capsys.readouterr().out
    for name in ("evp.png", "accuracy_vs_flops.png"):
        (copy,) = figures.glob(f"digits_*_{name}")
        assert copy.read_bytes() == (comparison / name).read_bytes()
        assert f"(figures/{copy.name})" in out
    assert results_main([str(root)]) == 2
    # --why adds the report's Why table, the same rows
    assert results_main([str(comparison), "--relative-to", str(root), "--why"]) == 0
    block = capsys.readouterr().out
    why = block[block.index("**Why: fit, activation scale and routing") :].splitlines()
    rows = [line for line in why if line.startswith("| ") and line[2:5] != "---"][1:]  # no header
    report = (comparison / "report.md").read_text()
    assert len(rows) == len(ARMS) and all(line in report for line in rows)
    # --across: an arm a row, a comparison a column, the numbers of the blocks
    assert results_main([str(comparison), str(comparison), "--across"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-len(ARMS) - 2 :]
    assert last[0].count("`digits (") == 2
    moe_row = next(line for line in last if line.startswith("| moe |"))
    cell = f"{100 * moe['test_acc_mean']:.2f}, " + f"{100 * moe['paired_diff']:+.2f}".replace(
        "-", "−"
    )
    assert moe_row.count(cell) == 2


def test_a_resume_keeps_the_recorded_batch_size(four, tmp_path: Path) -> None:
    """The batch size (which trials TPE proposes depends on it) is recorded; a resume asking for
    another is refused, naming it."""
    root, comparison, _ = four
    record = json.loads((comparison / "comparison.json").read_text())
    assert record["batch_size"] == 2 * len(ARMS)  # two joblib workers × four arms
    copy = tmp_path / comparison.name
    shutil.copytree(comparison, copy, ignore=shutil.ignore_patterns(".compare.lock", ".jobs.lock"))
    proc = run_module("moe_lab.compare", *TINY4, *_paths(root), f"resume={copy}",
                      "compare.batch_size=3", cwd=root, **_env(root))  # fmt: skip
    assert proc.returncode == 2
    assert "started with batch size 8" in proc.stderr and "compare.batch_size=3" in proc.stderr
    same = run_module("moe_lab.compare", *TINY4, *_paths(root), f"resume={copy}",
                      "hydra/launcher=basic", cwd=root, **_env(root))  # fmt: skip
    assert same.returncode == 0, same.stderr[-3000:]
    assert "launching" not in same.stdout  # nothing left to run
    log = (copy / "comparison.log").read_text().splitlines()
    assert [line for line in log if " resume: " in line][-1].endswith("batches of 8")


@pytest.mark.slow
def test_killed_and_resumed_under_other_parallelism_proposes_the_same_trials(
    tmp_path: Path,
) -> None:
    """TPE's proposals depend on which trials run together: a comparison killed after its first
    trial and resumed under the basic launcher (one job at a time) proposes exactly what the
    uninterrupted one (joblib, two workers) proposed, because it keeps the recorded batch size."""
    args = ["experiment=digits", "compare.arms=[cnn,moe]", "compare.trials=6", "compare.seeds=2",
            "compare.tpe_startup_trials=2", "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "logger=csv"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for root in (whole, cut):
        root.mkdir()
    done = run_module("moe_lab.compare", *args, *_paths(whole), cwd=whole, timeout=900,
                      **_env(whole))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_lab.compare", *args, *_paths(cut)], cwd=cut,
        env=cli_env(**_env(cut)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    first = lambda: list((cut / "out").glob("compare/*/*/tune/cnn/trial_000/summary.json"))  # noqa: E731
    kill_when(lambda: first() and json.loads(first()[0].read_text())["status"] == "completed",
              proc, timeout=400)  # fmt: skip
    comparison = _comparison_dir(cut)
    resumed = run_module("moe_lab.compare", *args, *_paths(cut), f"resume={comparison}",
                         "hydra/launcher=basic", cwd=cut, timeout=900, **_env(cut))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def proposals(root: Path) -> dict:
        storage = f"sqlite:///{_comparison_dir(root) / 'study.db'}"
        return {
            arm: [
                (t.number, t.params, t.user_attrs["proposal"]["guided"])
                for t in optuna.load_study(study_name=arm, storage=storage).get_trials()
                if not t.user_attrs.get("abandoned")
            ]
            for arm in ("cnn", "moe")
        }

    expected, got = proposals(whole), proposals(cut)
    assert expected == got
    assert any(guided for *_, guided in expected["cnn"])  # TPE did guide some of them
    assert not math.isnan(pd.read_csv(comparison / "summary.csv")["test_acc_mean"].iloc[0])
