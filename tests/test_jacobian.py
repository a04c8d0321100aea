"""The Jacobian-spectrum experiment (``python -m moe_lab.jacobian``, computed in
:mod:`moe_lab.experiments.jacobian`), its record ``jacobian.json``
(:mod:`moe_lab.run.jacobian_record`) and its spectrum statistics.

The reference throughout is independent of the code under test: NumPy SVDs of Jacobians built by
central finite differences, in float64, of a forward pass written here from the models' weights.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moe_lab.analysis import find_run_dirs, load_runs
from moe_lab.analysis.spectrum import (
    condition_number,
    effective_rank,
    mean_spectrum,
    numerical_rank,
)
from moe_lab.experiments.jacobian import (
    JacobianSettings,
    ModelEntry,
    build_models,
    read_record,
    record_from_dict,
    run_experiment,
    sample_inputs,
)
from moe_lab.run.jacobian_record import SpectrumStats

EPS32 = float(np.finfo(np.float32).eps)

# A small run of the app; the finite-difference reference below uses the same settings.
SMALL = {"n_inputs": 5, "width": 8, "n_experts": (1, 3, 20), "seed": 3}


def _run_app(*overrides: str, cwd: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "moe_lab.jacobian", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Hydra app end to end at SMALL, run as a user would; returns its run dir."""
    cwd = tmp_path_factory.mktemp("jacobian_app")
    run_dir = cwd / "run"
    ks = ",".join(str(k) for k in SMALL["n_experts"])
    proc = _run_app(
        f"n_inputs={SMALL['n_inputs']}",
        f"width={SMALL['width']}",
        f"n_experts=[{ks}]",
        f"seed={SMALL['seed']}",
        f"hydra.run.dir={run_dir}",
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(run_dir) in proc.stdout  # it says where the files are
    assert "moe_K20" in proc.stdout and "dense_relu" in proc.stdout  # and prints the table
    return run_dir


# ---------------------------------------------------------------------------------------------
# Independent reference: float64 forward passes from the weights, central finite differences
# ---------------------------------------------------------------------------------------------


def _reference_forward(entry: ModelEntry):
    """The model's map x (in,) -> y (out,) in float64 NumPy, written from the original's equation."""
    if entry.n_experts is None:
        w = entry.module.linear.weight.detach().double().numpy()  # (out, in)
        b = entry.module.linear.bias.detach().double().numpy()
        return lambda x: np.maximum(w @ x + b, 0.0)
    layer = entry.module
    wk = layer.expert_kernel.detach().double().numpy()  # (in, out, K)
    vk = layer.gating_kernel.detach().double().numpy()  # (in, K)
    ck = layer.expert_bias.detach().double().numpy()  # (out, K)
    dk = layer.gating_bias.detach().double().numpy()  # (K,)

    def forward(x: np.ndarray) -> np.ndarray:
        logits = x @ vk + dk
        gates = np.exp(logits - logits.max())
        gates /= gates.sum()
        y = np.zeros(wk.shape[1])
        for k in range(wk.shape[2]):
            y += gates[k] * np.maximum(x @ wk[:, :, k] + ck[:, k], 0.0)
        return y

    return forward


def _fd_jacobian(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    cols = []
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        cols.append((f(x + e) - f(x - e)) / (2 * h))
    return np.stack(cols, axis=1)  # (out, in)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """Per model label: (n_inputs, width) singular values of finite-difference Jacobians."""
    settings = JacobianSettings(**SMALL)
    xs = sample_inputs(settings).double().numpy()  # the app's float32 points, exactly
    out = {}
    for entry in build_models(settings):
        f = _reference_forward(entry)
        out[entry.label] = np.stack(
            [np.linalg.svd(_fd_jacobian(f, x), compute_uv=False) for x in xs]
        )
    return out


def _ref_effective_rank(s: np.ndarray) -> float:
    p = s / s.sum()
    return math.exp(-sum(pi * math.log(pi) for pi in p if pi > 0))


def _ref_numerical_rank(s: np.ndarray, width: int) -> int:
    return int(np.sum(s > s.max() * width * EPS32))


def test_record_matches_finite_differences(small_run: Path, reference: dict) -> None:
    summary = json.loads((small_run / "jacobian.json").read_text())
    width, n = SMALL["width"], SMALL["n_inputs"]
    assert set(summary["models"]) == {"dense_relu", "moe_K1", "moe_K3", "moe_K20"}
    for label, s in reference.items():
        got = summary["models"][label]
        want_erank = np.mean([_ref_effective_rank(row) for row in s])
        want_rank = np.mean([_ref_numerical_rank(row, width) for row in s])
        conds = [
            math.inf if row.min() <= row.max() * width * EPS32 else row.max() / row.min()
            for row in s
        ]
        want_cond = statistics.median(conds)
        assert got["effective_rank"] == pytest.approx(want_erank, rel=1e-4), label
        assert got["numerical_rank"] == pytest.approx(want_rank, abs=1e-9), label
        assert got["singular_fraction"] == pytest.approx(np.mean(np.isinf(conds))), label
        if math.isinf(want_cond):
            assert got["median_condition_number"] is None, label
        else:
            assert got["median_condition_number"] == pytest.approx(want_cond, rel=1e-3), label
        assert got["numerical_rank_se"] == pytest.approx(
            statistics.stdev([_ref_numerical_rank(row, width) for row in s]) / math.sqrt(n),
            abs=1e-9,
        )
    # the original's point, at this size: the ReLU layer loses rank, the K=20 mixture keeps it
    assert summary["models"]["dense_relu"]["numerical_rank"] < width
    assert summary["models"]["moe_K20"]["numerical_rank"] == width


def test_spectra_csv_matches_finite_differences(small_run: Path, reference: dict) -> None:
    table = pd.read_csv(small_run / "spectra.csv")
    assert list(table.columns) == ["model", "n_experts", "index", "mean_singular_value", "se"]
    width = SMALL["width"]
    dense = table[table["model"] == "dense_relu"]
    assert len(dense) == width and dense["n_experts"].isna().all()  # empty for the dense layer
    for label, s in reference.items():
        k = None if label == "dense_relu" else int(label.removeprefix("moe_K"))
        if k is None:
            rows = table[table["n_experts"].isna()]
        else:
            rows = table[(table["model"] == "moe") & (table["n_experts"] == k)]
        assert rows["index"].tolist() == list(range(width))
        ordered = -np.sort(-s, axis=1)
        want_mean = ordered.mean(axis=0)
        want_se = np.array(
            [statistics.stdev(ordered[:, i]) / math.sqrt(len(s)) for i in range(width)]
        )
        # singular values below the float32 rank tolerance are rounding noise in the app
        floor = s.max() * width * EPS32 * 10
        np.testing.assert_allclose(
            rows["mean_singular_value"].to_numpy(), want_mean, rtol=1e-4, atol=floor
        )
        np.testing.assert_allclose(rows["se"].to_numpy(), want_se, rtol=1e-3, atol=floor)


def test_app_writes_the_three_files(small_run: Path) -> None:
    assert (small_run / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((small_run / "jacobian.json").read_text())  # strict JSON: no inf / NaN
    assert record["experiment"] == "jacobian"
    assert record["settings"]["n_experts"] == list(SMALL["n_experts"])
    assert record["settings"]["width"] == SMALL["width"]
    assert "n_inputs=5" in record["overrides"]
    assert record["wall_time_s"] > 0
    assert not (small_run / "summary.json").exists()  # that name is a training run's record
    assert not list(small_run.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_record_reads_back_into_its_types(small_run: Path) -> None:
    record = read_record(small_run)
    raw = json.loads((small_run / "jacobian.json").read_text())
    assert record.settings == JacobianSettings(**{**SMALL, "n_experts": SMALL["n_experts"]})
    assert set(record.models) == set(raw["models"])
    for label, stats in record.models.items():
        assert isinstance(stats, SpectrumStats)
        assert stats.numerical_rank == raw["models"][label]["numerical_rank"]
    assert record.to_dict() == raw  # what was written is exactly what the type writes
    # every statistic is defined in the file, from the one definition
    assert set(raw["definitions"]) == set(SpectrumStats.__dataclass_fields__)
    with pytest.raises(ValueError, match="not a Jacobian record"):
        record_from_dict({**raw, "experiment": "mnist1d"})
    broken = {**raw, "models": {"moe_K1": {"model": "moe"}}}
    with pytest.raises(ValueError, match="moe_K1"):
        record_from_dict(broken)


def test_run_dir_reads_without_torch_or_the_layers(small_run: Path) -> None:
    # moe_lab.run and moe_lab.analysis sit below the experiment: reading a Jacobian run dir's
    # record needs neither torch nor moe_lab.layers, and no analysis module imports the layers
    code = (
        "import json, sys, pkgutil, importlib\n"
        "from moe_lab.run.jacobian_record import JacobianRecord\n"
        f"record = JacobianRecord.read({str(small_run)!r}, dict)\n"
        "torch_loaded = 'torch' in sys.modules\n"
        "import moe_lab.analysis\n"
        "for m in pkgutil.iter_modules(moe_lab.analysis.__path__):\n"
        "    importlib.import_module('moe_lab.analysis.' + m.name)\n"
        "layers = [m for m in sys.modules if m.startswith('moe_lab.layers')]\n"
        "print(json.dumps([record.settings['width'], sorted(record.models), torch_loaded, layers]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    width, models, torch_loaded, layers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert width == SMALL["width"] and "dense_relu" in models
    assert not torch_loaded and layers == []


def test_sweep_reader_does_not_take_a_jacobian_run_for_a_training_run(small_run: Path) -> None:
    # the run dir has .hydra/ and a log file, which mark a training job dir for the sweep reader
    assert (small_run / ".hydra").is_dir()
    assert find_run_dirs(small_run.parent) == []
    assert find_run_dirs(small_run) == []
    with pytest.raises(ValueError, match="no runs"):
        load_runs(small_run.parent)


def test_bad_config_fails_naming_the_key(tmp_path: Path) -> None:
    proc = _run_app("n_experts=[0]", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "n_experts" in proc.stderr and "got 0" in proc.stderr
    assert not (tmp_path / "run" / "jacobian.json").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("n_experts", (0,)),
        ("n_experts", ()),
        ("n_experts", (2, 2)),
        ("width", 0),
        ("width", -3),
        ("n_inputs", 1),
        ("expert_activation", "rleu"),
        ("gating_activation", "nope"),
        ("dtype", "float16"),
        ("seed", -1),
        ("chunk_size", 0),
        ("num_threads", 0),
        ("uniform_gate_control", "yes"),
    ],
)
def test_settings_reject_bad_values(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        JacobianSettings(**{key: value})


def test_missing_conf_dir_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    proc = _run_app(cwd=tmp_path, MOE_LAB_CONFIG_DIR=str(tmp_path / "conf"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: MOE_LAB_CONFIG_DIR={tmp_path / 'conf'} has no jacobian.yaml; point "
        "MOE_LAB_CONFIG_DIR at a copy of moe_lab's conf/ dir, or unset it to use the configs "
        "installed with moe_lab"
    ]


# ---------------------------------------------------------------------------------------------
# Models, inputs, Jacobians
# ---------------------------------------------------------------------------------------------


def test_dense_baseline_uses_keras_init() -> None:
    (dense, *_) = build_models(JacobianSettings(width=64, n_experts=(1,)))
    weight = dense.module.linear.weight
    bound = math.sqrt(6 / (64 + 64))  # Glorot uniform
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.9 * bound  # uniform over the whole range, not PyTorch's default
    assert torch.count_nonzero(dense.module.linear.bias) == 0


def test_model_weights_depend_on_seed_and_k_only() -> None:
    a = {e.label: e.module for e in build_models(JacobianSettings(width=6, n_experts=(3,)))}
    b = {e.label: e.module for e in build_models(JacobianSettings(width=6, n_experts=(1, 3)))}
    c = {e.label: e.module for e in build_models(JacobianSettings(width=6, n_experts=(3,), seed=1))}
    assert torch.equal(a["moe_K3"].expert_kernel, b["moe_K3"].expert_kernel)
    assert torch.equal(a["dense_relu"].linear.weight, b["dense_relu"].linear.weight)
    assert not torch.equal(a["moe_K3"].expert_kernel, c["moe_K3"].expert_kernel)


def test_inputs_are_uniform_on_the_unit_cube() -> None:
    x = sample_inputs(JacobianSettings(n_inputs=400, width=50))
    assert x.shape == (400, 50) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() < 1
    assert abs(x.mean().item() - 0.5) < 0.01
    assert torch.equal(x, sample_inputs(JacobianSettings(n_inputs=400, width=50)))


def test_float64_run_matches_finite_differences_tightly(reference: dict) -> None:
    result = run_experiment(**SMALL, dtype="float64")
    for label, s in reference.items():
        np.testing.assert_allclose(result.singular_values[label], s, rtol=1e-6, atol=1e-8)


def test_uniform_gate_control_has_constant_gates_and_the_same_experts() -> None:
    settings = JacobianSettings(
        n_inputs=4, width=7, n_experts=(3,), dtype="float64", uniform_gate_control=True
    )
    entries = {e.label: e for e in build_models(settings)}
    assert list(entries) == ["dense_relu", "moe_K3", "moe_uniform_K3"]
    learned, uniform = entries["moe_K3"].module, entries["moe_uniform_K3"].module
    assert torch.equal(learned.expert_kernel, uniform.expert_kernel)
    assert torch.count_nonzero(learned.gating_kernel) > 0
    # with gates fixed at 1/K the Jacobian is (1/K) sum_k diag(relu'(W_k x + c_k)) W_k^T
    w = uniform.expert_kernel.numpy()  # (in, out, K)
    c = uniform.expert_bias.numpy()  # (out, K)
    xs = sample_inputs(settings).numpy()
    want = []
    for x in xs:
        jac = sum(
            np.diag((x @ w[:, :, k] + c[:, k] > 0).astype(float)) @ w[:, :, k].T for k in range(3)
        )
        want.append(np.linalg.svd(jac / 3, compute_uv=False))
    result = run_experiment(settings)
    np.testing.assert_allclose(result.singular_values["moe_uniform_K3"], want, atol=1e-12)
    assert set(result.spectra["model"]) == {"dense_relu", "moe", "moe_uniform"}


def test_run_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_experiment(n_inputs=2, width=3, n_experts=(2,), num_threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_tanh_experts_give_full_rank_even_with_one_expert() -> None:
    # tanh never switches a unit off, so even K=1 keeps every direction: the rank loss is ReLU's
    result = run_experiment(n_inputs=4, width=10, n_experts=(1,), expert_activation="tanh")
    assert result.models["moe_K1"].numerical_rank == 10
    assert result.models["dense_relu"].numerical_rank < 10


# ---------------------------------------------------------------------------------------------
# Spectrum statistics (moe_lab.analysis.spectrum)
# ---------------------------------------------------------------------------------------------


def test_numerical_rank_matches_numpy_matrix_rank() -> None:
    rng = np.random.default_rng(0)
    mats, spectra = [], []
    for r in (1, 3, 7, 9):
        a = (rng.standard_normal((9, r)) @ rng.standard_normal((r, 12))).astype(np.float32)
        mats.append(a)
        spectra.append(np.linalg.svd(a.astype(np.float64), compute_uv=False))
    got = numerical_rank(np.stack(spectra), (9, 12))
    assert got.tolist() == [np.linalg.matrix_rank(a) for a in mats] == [1, 3, 7, 9]


def test_effective_rank_against_its_definition() -> None:
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 2, size=(6, 5))
    s[0, 2:] = 0.0  # zeros contribute 0 log 0 = 0
    got = effective_rank(s)
    np.testing.assert_allclose(got, [_ref_effective_rank(row) for row in s], rtol=1e-12)
    assert effective_rank(np.ones(7)) == pytest.approx(7)  # flat spectrum: full
    assert effective_rank([3.0, 0.0, 0.0]) == pytest.approx(1)  # rank one
    assert effective_rank(np.zeros(4)) == 0  # the zero matrix


def test_condition_number_matches_numpy_and_is_inf_when_singular() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4, 6, 6))
    s = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(condition_number(s, (6, 6)), np.linalg.cond(a), rtol=1e-10)
    assert condition_number([2.0, 1.0, 0.0], (3, 3)) == math.inf
    assert condition_number([2.0, 1.0, 1e-9], (3, 3)) == math.inf  # below the float32 tolerance


def test_mean_spectrum_sorts_each_row_and_uses_the_sample_std() -> None:
    s = np.array([[1.0, 3.0, 2.0], [6.0, 4.0, 5.0], [0.0, 9.0, 7.0]])
    mean, se = mean_spectrum(s)
    rows = [sorted(r, reverse=True) for r in s.tolist()]
    for i in range(3):
        col = [r[i] for r in rows]
        assert mean[i] == pytest.approx(sum(col) / 3)
        assert se[i] == pytest.approx(statistics.stdev(col) / math.sqrt(3))
    with pytest.raises(ValueError, match="n >= 2"):
        mean_spectrum(s[:1])
