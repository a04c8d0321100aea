"""The benchmark (``python -m moe_lab.bench``): its record follows from its own samples, its floor
is the layer's own two products, its roofline's bytes follow the stated formula, its training
runs are built from the composed config (a trainer override reaches them), and bad input gets a
clear refusal. Timings are never asserted: they depend on the machine."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO_ROOT, run_module
from moe_lab.bench import layers, main, parse_args, training
from moe_lab.bench.context import Context
from moe_lab.bench.measure import interleave
from moe_lab.bench.report import Row, render_markdown
from moe_lab.layers import Conv1dMoE, Conv2dMoE

CPU = torch.device("cpu")


def _ctx(tmp_path: Path, overrides: list[str] = (), repeats: int = 1) -> Context:
    ctx = Context(CPU, quick=True, repeats=repeats, overrides=list(overrides), scratch=tmp_path)
    ctx.bandwidth, ctx.gemm = 1e10, 1e10
    return ctx


def _interpolate(ordered: list[float], position: float) -> float:
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _check_row(row: dict[str, Any]) -> None:
    """Every time is the median of its samples; every ratio the median of its per-round
    ratios."""
    for label, samples in row["samples"].items():
        assert row["times"][label] == pytest.approx(statistics.median(samples), rel=1e-12)
        assert all(s > 0 for s in samples)
    for check in row["checks"].values():
        if check["num"] is not None:
            pairs = zip(row["samples"][check["num"]], row["samples"][check["den"]], strict=True)
            ratios = sorted(a / b for a, b in pairs)
            assert check["value"] == pytest.approx(statistics.median(ratios))
            if len(ratios) < 2:
                assert check["quartiles"] is None
            else:  # linear interpolation between order statistics, at 1/4 and 3/4 of the way
                assert check["quartiles"] == pytest.approx(
                    [_interpolate(ratios, q * (len(ratios) - 1)) for q in (0.25, 0.75)]
                )
        if check["limit"] is None:
            assert check["passed"] is None
        else:
            ok = (
                check["value"] <= check["limit"]
                if check["op"] == "<="
                else check["value"] >= check["limit"]
            )
            assert check["passed"] is ok


def test_quick_layer_sections_write_consistent_json_and_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    # the default (pinned) allocator is tested in a subprocess below: this process is shared
    assert main(["--quick", "--only", "layers,peers,capacity", "--device", "cpu", "--threads", "1",
                 "--malloc", "default", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "bench.json").read_text())
    assert report["allocator"] is None and "default thresholds" in (out / "bench.md").read_text()
    assert report["errors"] == [] and report["environment"]["torch"] == torch.__version__
    assert report["machine"]["copy_bandwidth_GBps"] > 0 and report["machine"]["gemm_GFLOPs"] > 0
    assert len(report["load_average_start"]) == 3
    rows = report["rows"]
    for row in rows:
        _check_row(row)
    by_section = {
        s: [r for r in rows if r["section"] == s] for s in ("layers", "peers", "capacity")
    }
    # the original's CIFAR-10 MoE network: four convs (in, out, H×W, padding), read from the model
    cifar = {
        (r["info"]["layer"]["in"], r["info"]["layer"]["out"], tuple(r["info"]["layer"]["input_size"]),
         r["info"]["layer"]["padding"])
        for r in by_section["layers"] if r["name"].startswith("Conv2dMoE cifar10")
    }  # fmt: skip
    assert cifar == {(3, 32, (32, 32), "same"), (32, 32, (32, 32), "valid"),
                     (32, 64, (15, 15), "same"), (64, 64, (15, 15), "valid")}  # fmt: skip
    for row in by_section["layers"]:
        # roofline = floor + epilogue bytes / bandwidth, round by round
        extra = row["info"]["epilogue_bytes"] / row["info"]["bandwidth"]
        assert row["samples"]["roofline"] == pytest.approx(
            [t + extra for t in row["samples"]["floor"]]
        )
        target = row["checks"]["× roofline"]["limit"]
        assert target == (1.25 if "cifar10 L" in row["name"] else None)
        assert ("× naive port" in row["checks"]) == (not row["name"].startswith("DenseMoE"))
    assert {type_ for r in by_section["layers"] for type_ in [r["info"]["layer"]["class"]]} == {
        "Conv1dMoE", "Conv2dMoE", "Conv3dMoE", "DenseMoE"}  # fmt: skip
    condconv = [r for r in by_section["peers"] if "CondConv2d" in r["name"]]
    assert condconv
    for row in condconv:  # roofline = CondConv's floor + the mix's bytes / bandwidth
        extra = row["info"]["mix_bytes"] / row["info"]["bandwidth"]
        assert row["samples"]["roofline"] == pytest.approx(
            [t + extra for t in row["samples"]["floor"]]
        )
        assert {"× peer", "× roofline", "peer × roofline"} <= set(row["checks"])
    # CondConv is measured with gate_groups=1, the original's gate per filter beside it
    assert all(
        "per-filter × peer" in r["checks"] for r in condconv if "dynamic_conv" not in r["name"]
    )
    assert any("dynamic_conv" in r["name"] and "MLP gate" in r["name"] for r in condconv)
    capacity = by_section["capacity"]
    assert capacity and all(r["checks"]["× peer"]["limit"] == 1.0 for r in capacity)
    assert all(0.0 <= r["info"]["dropped"] < 0.5 and not r["info"]["compiled"] for r in capacity)
    loop = [r for r in by_section["peers"] if "per-expert loop" in r["name"]]
    assert loop and all({"× peer", "× nn.Linear", "× roofline"} <= set(r["checks"]) for r in loop)
    table = (out / "bench.md").read_text()
    assert sum(
        line.startswith("| Conv") or line.startswith("| Dense") for line in table.splitlines()
    ) == len(rows)
    assert "GB/s" in table and "GFLOP/s" in table and "Lightning" in table
    assert "× roofline" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("shape", "expected_out"),
    [
        (layers.Shape("s", 2, 3, 4, (3, 3), (9, 8), "same"), (9, 8)),
        (layers.Shape("v", 2, 3, 4, (3, 3), (9, 8), "valid"), (7, 6)),
        (layers.Shape("1d", 1, 2, 5, (5,), (11,), "same"), (11,)),
        (layers.Shape("d", 0, 6, 5), ()),
    ],
)
def test_floor_is_the_layers_two_products_and_bytes_follow_the_formula(
    shape: layers.Shape, expected_out: tuple[int, ...]
) -> None:
    """With the layer's weights copied in, the floor's outputs ARE the layer's expert
    pre-activations and gate logits: mixing them by hand (softmax over K, weighted sum) gives
    the layer's output."""
    torch.manual_seed(0)
    k, batch = 3, 2
    layer = shape.build(k, gating_activation="softmax")  # linear experts
    floor = layers.Floor(shape, k)
    with torch.no_grad():
        if shape.ndim:
            floor.experts.weight.copy_(layer.expert_kernel)
            floor.experts.bias.copy_(layer.expert_bias.reshape(-1))
            floor.gate.weight.copy_(layer.gating_kernel.reshape(-1, shape.cout * k).T)
        else:
            floor.experts.weight.copy_(layer.expert_kernel.reshape(shape.cin, -1).T)
            floor.experts.bias.copy_(layer.expert_bias.reshape(-1))
            floor.gate.weight.copy_(layer.gating_kernel.T)
        floor.gate.bias.copy_(layer.gating_bias.reshape(-1))
    x = torch.randn(batch, shape.cin, *shape.size)
    hidden, logits = floor(x)
    out = layer(x)
    spatial = hidden.shape[2:]
    assert tuple(spatial) == expected_out
    h = hidden.reshape(batch, shape.cout, k, *spatial)
    if shape.ndim:
        gates = torch.softmax(logits.reshape(batch, shape.cout, k), -1)
    else:
        gates = torch.softmax(logits, -1)[:, None, :].expand(batch, shape.cout, k)
    mixed = (h * gates.reshape(*gates.shape, *([1] * len(spatial)))).sum(2)
    torch.testing.assert_close(out, mixed)
    n = batch * shape.cout * math.prod(expected_out)  # output elements
    assert layers.epilogue_bytes(shape, batch, k, out) == 4 * ((k + 1) * n + (2 * k + 1) * n)


def test_model_shapes_come_from_the_composed_config(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    mnist1d = layers.model_shapes(ctx, "mnist1d")
    assert mnist1d[0] == layers.Shape(mnist1d[0].label, 1, 1, 32, (5,), (40,), "same", first=True)
    assert (mnist1d[1].cin, mnist1d[1].padding, mnist1d[1].first) == (32, "valid", False)
    assert mnist1d[-1].ndim == 0 and mnist1d[-1].cout == 256
    assert [type(layers.Shape.build(s, 2)) for s in mnist1d[:2]] == [Conv1dMoE, Conv1dMoE]


def test_routing_rows_share_one_interleaved_group(tmp_path: Path) -> None:
    rows = layers.run_routing(_ctx(tmp_path))
    assert [r.name.split("top_k=")[1] for r in rows] == ["1", "2"]
    # the dense K=16 side is the same measurement in every row of the group
    assert rows[0].samples["dense K=16"] == rows[1].samples["dense K=16"]
    for row in rows:
        _check_row(row.to_json())
        assert row.checks["× dense K=k"].limit == 1.5


@pytest.mark.parametrize("make_row", [layers._condconv_row, layers._dynamic_conv_row])
def test_missing_timm_is_a_row_that_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_row
) -> None:
    def no_timm(*args: object, **kwargs: object) -> None:
        raise ImportError("No module named 'timm'")

    monkeypatch.setattr(layers, "TimmCondConv", no_timm)
    row = make_row(_ctx(tmp_path), 2, 4, 4, 4, 2)
    assert row.name.endswith("timm not installed") and not row.checks and not row.times


@pytest.mark.slow
def test_the_compiled_capacity_row_times_one_graph(tmp_path: Path) -> None:
    """The capacity row's compiled side is the fullgraph compile of the layer (no graph break, no
    recompile: either would raise), beside the eager layer and the loop."""
    rows = [layers._capacity_row(_ctx(tmp_path), 2, 1.25, 16, 8, batch, compiled=True)
            for batch in (32, 48)]  # fmt: skip
    row = rows[-1]  # a second shape is a fresh compile, not a (refused) recompile
    assert {"moe_lab", "peer", "moe_lab compiled"} <= set(row.samples)
    assert {"× peer", "compiled × peer", "compiled × eager"} <= set(row.checks)
    assert row.info["compiled"] and 0.0 <= row.info["dropped"] < 1.0
    # the 16 experts of capacity ceil(1.25 * 48 * 2 / 16) = 8 rows each
    assert row.info["rows_computed"] == 128 and row.info["rows_kept"] <= 96


def test_lightning_runs_follow_a_trainer_override(tmp_path: Path, data_dir: Path) -> None:
    """The acceptance check: trainer settings changed through config reach the bench's Trainer
    (read back from it), and the plain loop runs the steps the Trainer ran."""
    overrides = ["++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
                 "trainer.precision=bf16-mixed", f"paths.data_dir={data_dir}"]  # fmt: skip
    (row,) = training.run_lightning(_ctx(tmp_path / "s", overrides))
    info = row.info
    settings = (info["precision"], info["max_epochs"], info["limit_train_batches"])
    assert settings == ("bf16-mixed", 2, 2)
    assert (
        info["steps"] == 2
        and info["val_batches"] == 1
        and info["checkpoint"]
        and info["loggers"] == ["CSVLogger"]
    )
    assert {"ModelCheckpoint", "DivergenceMonitor"} <= set(info["callbacks"])
    assert info["run_dir"].endswith("fit")  # its own run dir, not the plain loop's
    _check_row(row.to_json())
    assert (
        row.checks["throughput × plain"].op == ">="
        and row.checks["throughput × plain"].limit == 0.95
    )


@pytest.mark.slow
def test_original_projection_follows_its_measurements(tmp_path: Path, data_dir: Path) -> None:
    (row,) = training.run_original(_ctx(tmp_path, [f"paths.data_dir={data_dir}"]))
    data = row.to_json()
    _check_row(data)
    for model in ("moe", "cnn"):
        step, val = row.times[f"{model} step"], row.times[f"{model} val batch"]
        expected = 16 * (math.ceil(50_000 / 32) * step + math.ceil(10_000 / 256) * val)
        assert row.checks[f"{model} run, s"].value == pytest.approx(expected)
        assert row.checks[f"{model} run, s"].limit is None  # the 30 s target is for an H100


def test_interleave_rotates_the_order_and_drops_warmup() -> None:
    calls: list[str] = []

    def side(tag: str):
        return lambda: calls.append(tag) or float(len(calls))

    samples = interleave({"a": side("a"), "b": side("b"), "c": side("c")}, warmup=1, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert samples == {"a": [4.0, 9.0, 11.0], "b": [5.0, 7.0, 12.0], "c": [6.0, 8.0, 10.0]}


def test_row_ratio_is_the_median_of_per_round_ratios() -> None:
    row = Row("x", "r")
    row.add("a", [1.0, 4.0, 9.0])
    row.add("b", [2.0, 2.0, 3.0])
    check = row.ratio("a/b", "a", "b", 1.0)
    assert check.value == pytest.approx(2.0) and check.passed is False  # ratios 0.5, 2, 3
    assert check.quartiles == pytest.approx((1.25, 2.5))  # halfway 0.5-2, halfway 2-3
    assert row.times == {"a": 4.0, "b": 2.0}
    assert "2.00 [1.25-2.50] (≤ 1) miss" in render_markdown(_REPORT, [row], {"x": "X"})


_REPORT = {
    "started": "now",
    "wall_time_s": 1.0,
    "load_average_start": None,
    "load_average_end": None,
    "errors": [],
    "machine": {"copy_bandwidth_GBps": 1.0, "gemm_GFLOPs": 1.0},
    "environment": {"device": "cpu", "cpu_model": "c", "cpu_count": 2, "torch_threads": 1,
                    "gpu": None, "torch": "t", "lightning": "l", "python": "p"},
}  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["--only", "layers,nope"],
        ["--only", ""],
        ["--repeats", "3"],
        ["--device", "tpu"],
        ["--threads", "0"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_unusable_device_or_existing_out_dir_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda", "--only", "layers", "--out", str(tmp_path / "n")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "n").exists()
    (tmp_path / "taken").mkdir()
    assert main(["--only", "layers", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = ["--only", "lightning", "trainer.no_such_key=1", "--out", str(tmp_path / "o")]
    assert main(bad) == 2
    assert "trainer.no_such_key" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_module_entry_point_help() -> None:
    proc = run_module("moe_lab.bench", "--help", cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("--only", "--quick", "--device", "layers", "lightning", "original", "overrides"):
        assert word in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_gpu_layers(tmp_path: Path) -> None:
    out = tmp_path / "g"
    assert main(["--quick", "--only", "layers", "--device", "cuda", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["environment"]["gpu"] and report["rows"]
    for row in report["rows"]:
        _check_row(row)


@pytest.mark.parametrize("gate_groups", [1, None])
def test_condconv_floor_is_the_layers_conv_and_router_and_its_bytes_the_formula(
    gate_groups: int | None,
) -> None:
    """With the layer's per-sample kernels (mixed here by hand from its gates) and its gate
    copied in, the floor's grouped convolution IS the layer's output and its router gives the
    layer's gate logits, with one gate (CondConv's) or one per filter (the original's)."""
    torch.manual_seed(0)
    k, cin, cout, batch = 3, 4, 5, 2
    layer = Conv2dMoE(cin, cout, k, 3, gate_input="pooled", padding=1, gate_groups=gate_groups,
                      expert_backend="kernel_mix", gating_activation="sigmoid")  # fmt: skip
    with torch.no_grad():
        layer.expert_bias.normal_()
        layer.gating_bias.normal_()
    groups = 1 if gate_groups == 1 else cout
    floor = layers.CondConvFloor(cin, cout, k, batch, padding=1, gate_groups=groups)
    x = torch.randn(batch, cin, 6, 7)
    with torch.no_grad():
        gate_kernel, gate_bias = layer.gating_kernel.reshape(cin, -1), layer.gating_bias.reshape(-1)
        logits = x.mean((2, 3)) @ gate_kernel + gate_bias
        gates = torch.sigmoid(logits).view(batch, groups, k).expand(batch, cout, k)
        experts = layer.expert_kernel.view(cout, k, cin, 3, 3)
        for b in range(batch):
            for f in range(cout):
                floor.kernels[b * cout + f] = sum(gates[b, f, e] * experts[f, e] for e in range(k))
                floor.bias[b * cout + f] = (gates[b, f] * layer.expert_bias[f]).sum()
        floor.router.weight.copy_(gate_kernel.T)
        floor.router.bias.copy_(gate_bias)
        y, router_logits = floor(x)
        torch.testing.assert_close(y, layer(x))
        torch.testing.assert_close(router_logits, logits)
    width = 9 * cin
    forward = k * cout * width + batch * cout * width
    backward = batch * cout * width + 2 * k * cout * width
    assert layers.condconv_mix_bytes(cin, cout, k, batch) == 4 * (forward + backward)


_PINNED_PROBE = """
import json, resource, sys, torch
from moe_lab.bench.measure import pin_allocator
settings = pin_allocator()
sizes = [8, 20, 12, 3, 30, 8, 20, 12, 3, 30]  # MiB, all below the pinned 32 MiB mmap threshold
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in sizes:  # warm-up: the heap grows to hold the largest
    torch.ones(mib * 2**18)
before = faults()
for _ in range(5):
    for mib in sizes:
        torch.ones(mib * 2**18)  # allocate, touch every page, free
json.dump({"settings": settings, "faults": faults() - before}, sys.stdout)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pinned_allocator_reuses_freed_memory_without_page_faults() -> None:
    """Pinned, 50 tensors of 3-30 MiB allocated, written and freed in turn fault in (almost) no
    fresh pages after one warm-up round: freed memory stays resident for the next tensor.
    Unpinned, glibc maps each block above its adaptive threshold afresh."""
    proc = subprocess.run([sys.executable, "-c", _PINNED_PROBE], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["settings"] == {"mmap_threshold": 32 * 2**20, "trim_threshold": 2**31 - 1}
    touched_pages = 5 * sum([8, 20, 12, 3, 30, 8, 20, 12, 3, 30]) * 2**20 // 4096
    assert result["faults"] < touched_pages // 100, result
