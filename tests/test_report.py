"""The sweep report files, ``python -m moe_lab.report`` and the Hydra callback.

Numbers in report.md / summary.csv are checked against values recomputed from the raw run files
with the formulas in tests/test_analysis.py (an independent path from the module's scipy calls).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from moe_lab.analysis import write_report
from moe_lab.analysis.callbacks import SweepReportCallback
from moe_lab.report import main
from test_analysis import (
    N_SEEDS,
    make_sweep,
    raw_group_values,
    raw_summaries,
    ref_mean_se,
    ref_welch,
    write_run,
)

# ----------------------------------------------------------------------------------------------
# reading report.md back
# ----------------------------------------------------------------------------------------------


def parse_tables(markdown: str) -> list[tuple[str, str, list[dict[str, str]]]]:
    """(``## `` heading, ``### `` heading, rows as {column: cell}) for every table in the file."""
    tables = []
    section = subsection = ""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section, subsection = line[3:], ""
        elif line.startswith("### "):
            subsection = line[4:]
        elif line.startswith("|"):
            header = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            i += 2  # skip the alignment row
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", lines[i].strip()[1:-1])]
                rows.append(dict(zip(header, cells, strict=True)))
                i += 1
            tables.append((section, subsection, rows))
            continue
        i += 1
    return tables


def table(markdown: str, section: str, subsection_start: str) -> dict[str, dict[str, str]]:
    """Rows (keyed by their first cell) of the table under ``section`` / ``subsection_start...``."""
    for sec, sub, rows in parse_tables(markdown):
        if sec == section and sub.startswith(subsection_start):
            return {next(iter(r.values())): r for r in rows}
    raise AssertionError(f"no table under {section!r} / {subsection_start!r}")


def number(cell: str) -> float:
    return math.nan if cell == "–" else float(cell.replace(",", ""))


def mean_se(cell: str) -> tuple[float, float, int | None]:
    """'73.12 ± 0.41 (n=3)' -> (73.12, 0.41, 3)."""
    match = re.fullmatch(r"(\S+) ± (\S+)(?: \(n=(\d+)\))?", cell)
    assert match, cell
    return number(match[1]), number(match[2]), int(match[3]) if match[3] else None


def close(shown: float, exact: float, decimals: int) -> bool:
    """``shown`` is ``exact`` rounded to ``decimals`` places (NaN matches NaN)."""
    if math.isnan(exact):
        return math.isnan(shown)
    return abs(shown - exact) <= 0.5 * 10**-decimals + 1e-9


# ----------------------------------------------------------------------------------------------
# report files
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A sweep with its report, built once for the tests that only read it."""
    sweep = make_sweep(tmp_path_factory.mktemp("built"))
    write_report(sweep)
    return sweep, (sweep / "report.md").read_text()


GROUPS = {
    "mnist1d": {"cnn": ("cnn", None), "cnn_matched": ("cnn_matched", None), "moe K=2": ("moe", 2)},
    "digits": {"cnn": ("cnn", None), "moe K=4": ("moe", 4)},
}


def test_group_tables_match_raw_files(built: tuple[Path, str]) -> None:
    sweep, report = built
    for data, groups in GROUPS.items():
        rows = table(report, f"Data: {data}", "Groups")
        assert set(rows) == set(groups)
        for group, (model, k) in groups.items():
            row = rows[group]
            completed = [
                s
                for s in raw_summaries(sweep)
                if s["data"] == data and s["model"] == model and s["n_experts"] == k
            ]
            n = sum(s["status"] == "completed" for s in completed)
            assert int(row["n"]) == n
            assert int(row["not completed"]) == len(completed) - n
            for column, field in (
                ("best val acc (%)", "val_acc_best"),
                ("last val acc (%)", "val_acc_last"),
                ("test acc (%)", "test_acc"),
            ):
                values = raw_group_values(sweep, data, model, k, field)
                ref_mean, ref_se = ref_mean_se(values)
                shown_mean, shown_se, shown_n = mean_se(row[column])
                assert close(shown_mean, 100 * ref_mean, 2), (data, group, column)
                assert close(shown_se, 100 * ref_se, 2), (data, group, column)
                assert shown_n == (None if len(values) == n else len(values))
            assert number(row["params"]) == raw_group_values(sweep, data, model, k, "params")[0]
            flops = raw_group_values(sweep, data, model, k, "flops_per_example")
            assert number(row["FLOPs / example"]) == (flops[0] if flops else math.nan) or not flops
            walls = raw_group_values(sweep, data, model, k, "wall_time_s")
            assert close(number(row["wall time (s, mean)"]), sum(walls) / len(walls), 1)
    # the one digits run without test accuracy shows as (n=2)
    assert table(report, "Data: digits", "Groups")["moe K=4"]["test acc (%)"].endswith("(n=2)")


def test_t_test_tables_match_formulas(built: tuple[Path, str]) -> None:
    sweep, report = built
    cases = {
        # data: (heading, metric field, baseline (model, K), {group: (model, K)})
        "mnist1d": (
            "Welch's t-test against `cnn_matched` on test accuracy",
            "test_acc",
            ("cnn_matched", None),
            {"cnn": ("cnn", None), "moe K=2": ("moe", 2)},
        ),
        "digits": (
            "Welch's t-test against `cnn` on last validation accuracy",
            "val_acc_last",
            ("cnn", None),
            {"moe K=4": ("moe", 4)},
        ),
    }
    for data, (heading, field, (base_model, base_k), groups) in cases.items():
        assert f"### {heading}" in report
        rows = table(report, f"Data: {data}", "Welch's t-test")
        assert set(rows) == set(groups)  # the baseline is not tested against itself
        base = raw_group_values(sweep, data, base_model, base_k, field)
        for group, (model, k) in groups.items():
            row = rows[group]
            values = raw_group_values(sweep, data, model, k, field)
            ref = ref_welch(values, base)
            assert int(row["n"]) == len(values) and int(row["n baseline"]) == len(base)
            assert close(number(row["difference (pp)"]), 100 * ref["diff"], 2)
            low, high = (float(x) for x in row["95% CI (pp)"].strip("[]").split(", "))
            assert close(low, 100 * ref["ci_low"], 2) and close(high, 100 * ref["ci_high"], 2)
            assert close(number(row["t"]), ref["t"], 3)
            assert close(number(row["df"]), ref["df"], 2)
            assert number(row["p (two-sided)"]) == pytest.approx(ref["p_value"], rel=5e-3)
            assert close(number(row["Hedges' g"]), ref["hedges_g"], 2)
    assert "so the last validation accuracy is compared" in report


def test_failed_runs_are_listed_not_averaged(built: tuple[Path, str]) -> None:
    sweep, report = built
    rows = table(report, "Runs not averaged in (4)", "")
    by_status = {r["status"]: r for r in rows.values()}
    assert set(by_status) == {"failed", "diverged", "partial", "missing"}
    assert (
        by_status["failed"]["detail"]
        == "RuntimeError: CUDA out of memory \\| tried to allocate 2 GiB"
    )
    assert by_status["diverged"]["detail"] == "diverged at epoch 2, step 300"
    assert by_status["partial"]["epochs"] == "2"
    assert "no summary.json" in by_status["missing"]["detail"]
    assert "seed=7" in by_status["missing"]["detail"]
    # the moe K=2 test-accuracy mean would include the failed run's 0.99 if averaged in
    shown, _, _ = mean_se(table(report, "Data: mnist1d", "Groups")["moe K=2"]["test acc (%)"])
    completed = raw_group_values(sweep, "mnist1d", "moe", 2, "test_acc")
    assert close(shown, 100 * sum(completed) / len(completed), 2)
    assert not close(shown, 100 * (sum(completed) + 0.99) / (len(completed) + 1), 2)
    assert "SE = std / sqrt(n)" in report and "two-sided" in report


def test_summary_csv_has_one_row_per_run_with_raw_fields(built: tuple[Path, str]) -> None:
    sweep = built[0]
    table_ = pd.read_csv(sweep / "summary.csv")
    job_dirs = {str(p.parent.resolve()) for p in sweep.rglob(".hydra")}
    assert set(table_["run_dir"]) == job_dirs
    assert len(table_) == len(job_dirs) == 3 * N_SEEDS + 4 + 6
    indexed = table_.set_index("run_dir")
    for path in sweep.rglob("summary.json"):
        raw = json.loads(path.read_text())
        row = indexed.loc[str(path.parent.resolve())]
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
            "max_epochs",
        ):
            assert (pd.isna(row[field]) and raw[field] is None) or row[field] == raw[field]
        for field in ("n_experts", "flops_per_example", "error_type", "error_message"):
            assert (pd.isna(row[field]) and raw[field] is None) or row[field] == raw[field]
    assert sorted(table_["status"].value_counts().items()) == [
        ("completed", 3 * N_SEEDS + 6),
        ("diverged", 1),
        ("failed", 1),
        ("missing", 1),
        ("partial", 1),
    ]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_curves_png_is_a_sensible_png(built: tuple[Path, str]) -> None:
    sweep, report = built
    width, height = png_size(sweep / "curves.png")
    assert 800 <= width <= 3000 and 300 <= height <= 1500  # two subplots side by side
    assert (sweep / "curves.png").stat().st_size > 10_000
    assert "](curves.png)" in report


def test_writes_are_atomic_and_rebuild_replaces(sweep: Path) -> None:
    write_report(sweep)
    report = (sweep / "report.md").read_text()
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]
    (sweep / "report.md").write_text("stale")
    write_report(sweep)
    assert (sweep / "report.md").read_text() == report  # rebuilt, deterministic
    before = {
        name: (sweep / name).read_bytes() for name in ("summary.csv", "report.md", "curves.png")
    }
    with pytest.raises(ValueError, match="baseline 'mlp'"):
        write_report(sweep, baseline="mlp")
    assert before == {name: (sweep / name).read_bytes() for name in before}  # nothing touched


def test_failed_write_keeps_previous_report_and_leaves_no_temp_file(
    sweep: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_report(sweep)
    before = {
        name: (sweep / name).read_bytes() for name in ("summary.csv", "report.md", "curves.png")
    }
    (sweep / "0_model=cnn,seed=0" / "summary.json").unlink()  # the next report would differ

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(sweep)
    assert before == {name: (sweep / name).read_bytes() for name in before}
    assert not [p.name for p in sweep.iterdir() if p.name.endswith(".tmp")]


def test_all_failed_sweep_still_replaces_a_stale_figure(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for seed in range(2):
        write_run(
            sweep / str(seed),
            model="cnn",
            data="d",
            seed=seed,
            n_experts=None,
            status="failed",
            val_accs=[0.3],
            error_type="ValueError",
            error_message="bad",
        )
    (sweep / "curves.png").write_bytes(b"stale")
    (sweep / "0" / "summary.json").write_text(
        (sweep / "0" / "summary.json")
        .read_text()
        .replace('"bad"', '"\\u001b[1mbold\\u001b[0m\\nsecond line"')
    )
    write_report(sweep)
    png_size(sweep / "curves.png")
    report = (sweep / "report.md").read_text()
    assert "## Runs not averaged in (2)" in report
    assert "**No run completed**" in report
    assert "| ValueError: bold second line |" in report  # terminal codes and newlines removed


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_clean_sweep_prints_paths_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = make_sweep(tmp_path, with_bad_runs=False)
    code, out, err = run_main(capsys, str(sweep))
    assert code == 0 and err == ""
    assert out.split() == [
        str(sweep / "summary.csv"),
        str(sweep / "report.md"),
        str(sweep / "curves.png"),
        str(sweep / "curves.svg"),
    ]


def test_cli_failed_and_diverged_runs_are_listed_and_exit_non_zero(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("14_model=moe,seed=6", "15_model=moe,seed=7"):  # the partial and missing jobs
        shutil.rmtree(sweep / name)
    code, _, err = run_main(capsys, str(sweep), "--baseline", "cnn")
    assert code == 2
    assert err.strip().endswith(
        "2 of 20 jobs did not complete (1 diverged, 1 failed): 12_model=moe,seed=4 (failed), "
        f"13_model=moe,seed=5 (diverged); the report lists them, see {sweep / 'report.md'}"
    )
    assert "### Welch's t-test against `cnn` on test accuracy" in (sweep / "report.md").read_text()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_dir", r"error: sweep dir '.*/nope' does not exist"),
        ("empty_sweep", r"error: no runs found in sweep dir"),
        ("unknown_baseline", r"error: baseline 'mlp' has no completed run"),
        ("all_failed", r"error: none of the 2 runs completed \(2 failed\); see .*report\.md"),
        (
            "only_killed",
            r"error: none of the 2 runs completed \(1 invalid, 1 missing\); see .*report\.md",
        ),
        (
            "partial_run",
            r"error: 4 of 22 jobs did not complete \(1 diverged, 1 failed, 1 missing, 1 partial\): "
            r"12_model=moe,seed=4 \(failed\), 13_model=moe,seed=5 \(diverged\), "
            r"14_model=moe,seed=6 \(partial\), 15_model=moe,seed=7 \(missing\)",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    args = []
    if setup == "missing_dir":
        args = [str(tmp_path / "nope")]
    elif setup == "empty_sweep":
        (tmp_path / "empty").mkdir()
        args = [str(tmp_path / "empty")]
    elif setup == "unknown_baseline":
        args = [str(make_sweep(tmp_path, with_bad_runs=False)), "--baseline", "mlp"]
    elif setup == "all_failed":
        for seed in range(2):
            write_run(
                tmp_path / "s" / str(seed),
                model="cnn",
                data="d",
                seed=seed,
                n_experts=None,
                status="failed",
                val_accs=[],
                error_type="ValueError",
                error_message="bad",
            )
        args = [str(tmp_path / "s")]
    elif setup == "only_killed":
        (tmp_path / "s" / "0" / ".hydra").mkdir(parents=True)
        (tmp_path / "s" / "1").mkdir()
        (tmp_path / "s" / "1" / "summary.json").write_text('{"model": "cnn"}')
        args = [str(tmp_path / "s")]
    elif setup == "partial_run":
        args = [str(make_sweep(tmp_path))]
    code, _, err = run_main(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if ": warning: " not in line]
    assert len(lines) == 1, err
    assert re.match(r"python -m moe_lab\.report: " + message, lines[0]), err


def test_cli_summary_with_missing_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = make_sweep(tmp_path, with_bad_runs=False, with_digits=False)
    write_run(
        sweep / "99_broken",
        model="moe",
        data="mnist1d",
        seed=9,
        n_experts=2,
        val_accs=[0.5],
        test_acc=0.5,
        drop_fields=("test_acc",),
    )
    code, out, err = run_main(capsys, str(sweep))
    assert code == 2
    warning, error = err.splitlines()
    assert (
        f"{sweep / '99_broken' / 'summary.json'}: summary.json missing fields ['test_acc']"
        in warning
    )
    assert "warning:" in warning
    assert error.endswith(
        f"1 of 13 jobs did not complete (1 invalid): 99_broken (invalid); "
        f"the report lists them, see {sweep / 'report.md'}"
    )
    assert len(out.split()) == 4  # the report is still written, listing the broken run
    assert "missing fields ['test_acc']" in (sweep / "report.md").read_text()


def test_module_cli_runs_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moe_lab.report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("python -m moe_lab.report: error: sweep dir")


# ----------------------------------------------------------------------------------------------
# Hydra callback
# ----------------------------------------------------------------------------------------------


def _config(sweep: Path):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})


def test_callback_clean_sweep_writes_report_and_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = make_sweep(tmp_path, with_bad_runs=False)
    SweepReportCallback().on_multirun_end(_config(sweep))
    out = capsys.readouterr().out
    assert str(sweep / "report.md") in out and str(sweep / "curves.png") in out
    assert (sweep / "report.md").is_file() and (sweep / "summary.csv").is_file()


def test_callback_exits_1_after_writing_report_when_runs_failed(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        SweepReportCallback().on_multirun_end(_config(sweep))
    assert exit_info.value.code == 1
    assert (sweep / "report.md").is_file() and (sweep / "curves.png").is_file()
    err = capsys.readouterr().err
    assert "4 of 22 runs did not complete (1 diverged, 1 failed, 1 missing, 1 partial)" in err


def test_callback_report_failure_exits_non_zero_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import moe_lab.analysis.callbacks as callbacks

    def broken_report(*args: object, **kwargs: object) -> None:
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(callbacks, "write_any_report", broken_report)
    clean = make_sweep(tmp_path / "clean", with_bad_runs=False, with_digits=False)
    with pytest.raises(SystemExit) as exit_info:  # every run completed, but there is no report
        SweepReportCallback().on_multirun_end(_config(clean))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "could not write the report (RuntimeError: matplotlib exploded)" in err
    assert f"rebuild it with: python -m moe_lab.report {clean}" in err
    bad = make_sweep(tmp_path / "bad", with_digits=False)
    with pytest.raises(SystemExit) as exit_info:
        SweepReportCallback().on_multirun_end(_config(bad))
    assert exit_info.value.code == 1
    # the runs' own outcome is still said
    assert "4 of 16 runs did not complete" in capsys.readouterr().err


HYDRA_APP = """
import json, os
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    out = HydraConfig.get().runtime.output_dir
    failed = cfg.seed == cfg.fail_seed
    accs = [0.5 + 0.01 * cfg.seed, 0.6 + 0.01 * cfg.seed]
    with open(os.path.join(out, "metrics.csv"), "w") as f:
        f.write("epoch,step,train_loss,train_acc,val_loss,val_acc,lr\\n")
        for e, a in enumerate(accs):
            f.write(f"{e},{e + 1},1.0,{a},1.0,{a},0.001\\n")
    summary = dict(model="cnn", data="d", n_experts=None, seed=cfg.seed, params=10,
                   status="failed" if failed else "completed",
                   error_type="ValueError" if failed else None, error_message="boom" if failed else None,
                   epochs=2, val_acc_last=accs[-1], val_acc_best=max(accs), test_acc=accs[-1],
                   wall_time_s=1.0)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f)

if __name__ == "__main__":
    main()
"""

HYDRA_CONFIG = """
seed: 0
fail_seed: -1
hydra:
  callbacks:
    sweep_report:
      _target_: moe_lab.analysis.callbacks.SweepReportCallback
"""


def test_callback_inside_a_real_hydra_multirun(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(textwrap.dedent(HYDRA_APP))
    (tmp_path / "config.yaml").write_text(HYDRA_CONFIG)
    sweep = tmp_path / "multirun"
    result = subprocess.run(
        [sys.executable, "app.py", "-m", "seed=0,1,2", "fail_seed=1", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert result.returncode == 1, result.stderr
    assert f"report: {sweep / 'report.md'}" in result.stdout
    assert "1 of 3 runs did not complete (1 failed)" in result.stderr
    report = (sweep / "report.md").read_text()
    assert "| 1 | d | cnn | 1 | failed | 2 | ValueError: boom |" in report
    rows = table(report, "Data: d", "Groups")
    assert rows["cnn"]["n"] == "2"
