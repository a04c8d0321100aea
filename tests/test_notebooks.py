"""The notebooks in ``notebooks/``: committed without outputs, and each runs end to end.

Add a notebook by appending its file name to ``NOTEBOOKS``, and to ``SELF_CONTAINED`` when it needs
no input and no test of its own: ``layers_tour.ipynb`` and ``explore_results.ipynb`` (which needs a
sweep and a comparison) are run by the tests below, which also check what they compute.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import run_module

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

NOTEBOOKS = [
    "jacobian_spectrum.ipynb",
    "layers_tour.ipynb",
    "explore_results.ipynb",
]
SELF_CONTAINED = [
    "jacobian_spectrum.ipynb",
]
# Marks the line a probe cell (appended by a test) prints its JSON on.
RESULT_PREFIX = "@@notebook-test@@"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A ``python3`` kernel that runs this interpreter (the venv under test), whatever kernelspecs
    the user has installed: a private kernelspec dir holds the only ``python3`` it can find.
    The kernel inherits this process's environment (plus the spec's ``env``)."""
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (moe_lab tests)",
        "language": "python",
        # One torch thread: the notebooks' tensors are tiny, and on a busy 2-core CPU several
        # threads made layers_tour.ipynb 4x slower (27 s vs 6 s).
        "env": {
            "WANDB_MODE": "offline",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "OMP_NUM_THREADS": "1",
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _execute(
    nb: nbformat.NotebookNode, tmp_path: Path, workdir: Path | None = None
) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` in a fresh kernel whose working dir is ``workdir`` (default: an
    empty dir, so anything the notebook writes lands in tmp_path, not in the repo)."""
    if workdir is None:
        workdir = tmp_path / "cwd"
    workdir.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=120,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails
    return nb


def _outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def _images(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [out for out in _outputs(nb) if "image/png" in out.get("data", {})]


def _with_probe(nb: nbformat.NotebookNode, expression: str) -> nbformat.NotebookNode:
    """``nb`` plus a last cell that prints ``json.dumps(expression)`` on a marked line."""
    probe = f"import json as _json\nprint({RESULT_PREFIX!r} + _json.dumps({expression}))"
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    return nb


def _probe_result(nb: nbformat.NotebookNode) -> Any:
    text = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    lines = [line for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, f"probe cell printed {text!r}"
    return json.loads(lines[0][len(RESULT_PREFIX) :])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name} has outputs; clear them before committing"
            )


@pytest.mark.parametrize("name", SELF_CONTAINED)
def test_notebook_runs(name: str, tmp_path: Path) -> None:
    nb = _execute(nbformat.read(NOTEBOOK_DIR / name, as_version=4), tmp_path)
    assert not [out for out in _outputs(nb) if out.output_type == "error"]
    assert _images(nb), f"{name} draws no figure"


# -- layers_tour.ipynb ---------------------------------------------------------------------------


def test_layers_tour_counts_and_trains(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / "layers_tour.ipynb", as_version=4)
    probe = (
        '{"shapes_match": sizes["match"].tolist(),'
        ' "first_gating": int(params.iloc[0]["gating params"]),'
        ' "first_expert": int(params.iloc[0]["expert (or plain) params"]),'
        ' "total": int(params.loc["total", "total"]),'
        ' "losses": history["loss"].tolist(), "entropies": history["gate entropy"].tolist()}'
    )
    nb = _execute(_with_probe(nb, probe), tmp_path)
    assert len(_images(nb)) == 3  # gates, parameters per layer, training curves
    result = _probe_result(nb)

    assert result["shapes_match"] and all(result["shapes_match"])
    # The seed's first CIFAR layer: 32x32x3 inputs -> 32 filters x 2 experts, plus a (32, 2) bias.
    assert result["first_gating"] == 32 * 32 * 3 * 32 * 2 + 32 * 2
    assert result["first_expert"] == 32 * 2 * 3 * 3 * 3 + 32 * 2
    assert result["total"] == 7_560_140  # the seed's MoE model summary (SPEC 1.3)
    losses, entropies = result["losses"], result["entropies"]
    assert len(losses) == len(entropies) == 60
    assert losses[-1] < 0.5 * losses[0], "the tiny classifier did not learn"
    assert all(0.0 <= h <= math.log(4) + 1e-6 for h in entropies)


# -- explore_results.ipynb, on a real sweep -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-job sweep (cnn and moe on digits, seeds 0 and 1, 2 short epochs) made by the
    training CLI; returns its sweep dir. ``data.val_split`` carves the validation set out of the
    training set, so validation and test accuracies differ and the tests can tell them apart."""
    root = tmp_path_factory.mktemp("sweep")
    proc = run_module(
        "moe_lab.train",
        "-m",
        "data=digits",
        "model=cnn,moe",
        "seed=0,1",
        "data.val_split=0.2",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        "trainer.accelerator=cpu",
        "logger=csv",
        f"paths.data_dir={root / 'data'}",
        f"paths.log_dir={root / 'out'}",
        cwd=root,
        OMP_NUM_THREADS="1",  # 11 s instead of 54 s on a busy 2-core CPU
    )
    assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    markers = list((root / "out" / "multirun").glob("*/*/multirun.yaml"))
    assert len(markers) == 1, f"expected one sweep dir, found {markers}"
    return markers[0].parent


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny comparison (cnn vs moe on digits, 2 trials and 2 final seeds per arm, one
    short epoch) made by the comparison CLI; returns its dir."""
    root = tmp_path_factory.mktemp("comparison")
    proc = run_module(
        "moe_lab.compare",
        "experiment=digits",
        "compare.arms=[cnn,moe]",
        "compare.trials=2",
        "compare.seeds=2",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "logger=csv",
        "hydra/launcher=basic",
        f"paths.data_dir={root / 'data'}",
        f"paths.log_dir={root / 'out'}",
        cwd=root,
        timeout=600,
    )
    assert proc.returncode == 0, f"comparison failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    markers = list((root / "out" / "compare").glob("*/*/comparison.json"))
    assert len(markers) == 1, f"expected one comparison dir, found {markers}"
    return markers[0].parent


def _raw_summaries(sweep: Path) -> dict[str, dict]:
    """``{job dir name: parsed summary.json}``, read straight from the files."""
    return {path.parent.name: json.loads(path.read_text()) for path in sweep.glob("*/summary.json")}


def _last_metrics_row(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))[-1]


@pytest.mark.slow
def test_explore_results_on_a_real_sweep(
    tiny_sweep: Path,
    tiny_comparison: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOE_LAB_SWEEP_DIR", str(tiny_sweep))
    monkeypatch.setenv("MOE_LAB_COMPARE_DIR", str(tiny_comparison))
    nb = nbformat.read(NOTEBOOK_DIR / "explore_results.ipynb", as_version=4)
    probe = (
        '{"sweep_dir": SWEEP_DIR,'
        ' "points": {r.run_name: [r.metric, float(r.params), float(r.accuracy)] for r in points.itertuples()},'
        ' "groups": {r.group: [r.model, int(r.n), float(r.mean), float(r.se)] for r in group_stats.itertuples()},'
        ' "usage": {"|".join(map(str, key)): {str(c): float(v) for c, v in row.items()} for key, row in usage_table.iterrows()},'
        ' "compare_dir": COMPARE_DIR,'
        ' "trials": {f"{r.arm}/{r.trial}": [r.state, float(r.value), r.run_dir] for r in trials.itertuples()},'
        ' "evp": {f"{r.arm}/{r.n}": float(r.mean) for r in evp_table.itertuples()},'
        ' "final": {r.arm: [int(r.final_n), float(r.test_acc_mean)] for r in final_summary.itertuples()},'
        ' "best_params": best_params}'
    )
    nb = _execute(_with_probe(nb, probe), tmp_path)
    result = _probe_result(nb)
    assert result["sweep_dir"] == str(tiny_sweep)

    # curves, accuracy vs params, expert usage; then the comparison's EVP, trace, final curves
    assert len(_images(nb)) == 6
    _check_comparison_views(result, tiny_comparison)
    markdown = [
        out["data"]["text/markdown"]
        for out in _outputs(nb)
        if "text/markdown" in out.get("data", {})
    ]
    assert any("Welch's t-test" in text for text in markdown), "report.md is not shown"

    # One point per run: its params and test accuracy, as in its summary.json.
    raw = _raw_summaries(tiny_sweep)
    assert len(raw) == 4 and all(s["status"] == "completed" for s in raw.values())
    assert all(s["test_acc"] is not None for s in raw.values())  # so the metric is test_acc
    assert any(s["test_acc"] != s["val_acc_last"] for s in raw.values())  # and it is not val acc
    assert result["points"] == {
        name: ["test_acc", float(s["params"]), pytest.approx(s["test_acc"])]
        for name, s in raw.items()
    }

    # Group means ± SE (sample std / sqrt(n)) recomputed from the raw summaries, per model.
    by_model = {g[0]: g[1:] for g in result["groups"].values()}
    assert sorted(by_model) == ["cnn", "moe"]
    for model, (n, mean, se) in by_model.items():
        accs = [s["test_acc"] for s in raw.values() if s["model"] == model]
        assert n == len(accs) == 2
        assert mean == pytest.approx(statistics.fmean(accs))
        assert se == pytest.approx(statistics.stdev(accs) / math.sqrt(len(accs)), abs=1e-12)

    # Expert usage at the last epoch, averaged over the MoE runs, from the raw metrics.csv files.
    last_rows = [
        _last_metrics_row(tiny_sweep / name) for name, s in raw.items() if s["model"] == "moe"
    ]
    layers = sorted(
        column.split("/")[1]
        for column in last_rows[0]
        if column.startswith("gate/") and column.endswith("/entropy")
    )
    assert layers, "the MoE runs logged no gate columns"
    usage = {key.split("|")[-1]: row for key, row in result["usage"].items()}
    assert sorted(usage) == layers  # only the MoE group has gates
    for layer in layers:
        expected_entropy = statistics.fmean(float(r[f"gate/{layer}/entropy"]) for r in last_rows)
        assert usage[layer]["entropy (nats)"] == pytest.approx(expected_entropy)
        assert usage[layer]["ln K (uniform)"] == pytest.approx(math.log(2))
        for k in range(2):
            expected_gate = statistics.fmean(
                float(r[f"gate/{layer}/importance_{k}"]) for r in last_rows
            )
            assert usage[layer][f"mean gate, expert {k}"] == pytest.approx(expected_gate)


def _check_comparison_views(result: dict[str, Any], comparison: Path) -> None:
    """The notebook's comparison tables, against the comparison's raw summary.json files."""
    assert result["compare_dir"] == str(comparison)
    for arm in ("cnn", "moe"):
        tune = {
            p.parent.name: json.loads(p.read_text())
            for p in (comparison / "tune" / arm).glob("*/summary.json")
        }
        final = [
            json.loads(p.read_text()) for p in (comparison / "final" / arm).glob("*/summary.json")
        ]
        assert sorted(tune) == ["trial_000", "trial_001"] and len(final) == 2
        values = []
        for number in (0, 1):
            state, value, run_dir = result["trials"][f"{arm}/{number}"]
            assert state == "COMPLETE"
            assert value == tune[Path(run_dir).name]["val_acc_best"]
            values.append(value)
        # expected best of n draws with replacement, by enumerating the 2**n tuples
        assert result["evp"][f"{arm}/1"] == pytest.approx(statistics.fmean(values))
        pairs = [max(a, b) for a in values for b in values]
        assert result["evp"][f"{arm}/2"] == pytest.approx(statistics.fmean(pairs))
        n_final, test_mean = result["final"][arm]
        assert n_final == 2
        assert test_mean == pytest.approx(statistics.fmean(s["test_acc"] for s in final))
        best = max(range(2), key=lambda i: (values[i], -i))
        best_summary = tune[f"trial_{best:03d}"]
        assert all(
            f"{k}={v!r}" in best_summary["overrides"] for k, v in result["best_params"][arm].items()
        )


def _first_cell_only(probe: str) -> nbformat.NotebookNode:
    """explore_results.ipynb cut after its first code cell (which picks SWEEP_DIR), plus a probe."""
    nb = nbformat.read(NOTEBOOK_DIR / "explore_results.ipynb", as_version=4)
    first_code = next(i for i, cell in enumerate(nb.cells) if cell.cell_type == "code")
    nb.cells = nb.cells[: first_code + 1]
    return _with_probe(nb, probe)


def test_explore_results_defaults_to_the_newest_sweep(
    tiny_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset MOE_LAB_SWEEP_DIR: the newest sweep under outputs/multirun/ of the repo root, seen
    from notebooks/ (the kernel's working dir when Jupyter opens the notebook)."""
    monkeypatch.delenv("MOE_LAB_SWEEP_DIR", raising=False)
    repo = tmp_path / "repo"
    older = repo / "outputs" / "multirun" / "old" / "2020-01-01_00-00-00_0000"
    older.mkdir(parents=True)
    (older / "multirun.yaml").write_text("{}\n")
    os.utime(older / "multirun.yaml", (1_577_836_800, 1_577_836_800))  # 2020-01-01
    newer = repo / "outputs" / "multirun" / "adhoc" / "newest"
    newer.parent.mkdir(parents=True)
    newer.symlink_to(tiny_sweep, target_is_directory=True)

    nb = _execute(_first_cell_only("SWEEP_DIR"), tmp_path, workdir=repo / "notebooks")
    assert Path(_probe_result(nb)).resolve() == tiny_sweep.resolve()


def test_explore_results_without_a_sweep_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOE_LAB_SWEEP_DIR", raising=False)
    with pytest.raises(CellExecutionError, match="set MOE_LAB_SWEEP_DIR"):
        _execute(_first_cell_only("SWEEP_DIR"), tmp_path, workdir=tmp_path / "empty" / "notebooks")
