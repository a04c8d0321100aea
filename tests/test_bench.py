"""The benchmark suite (``python -m moe_lab.bench``): output structure, ratios recomputed from the
recorded samples, the layer shapes it measures, its refusals, and the interleaving it promises.

Timings are never asserted: they depend on the machine."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, run_module
from moe_lab.bench import main, parse_args
from moe_lab.bench.layers import ConvMoEFloor, LayerCase, routing_unsupported_reason
from moe_lab.bench.report import Target, make_row
from moe_lab.bench.timing import PairSamples, interleave
from moe_lab.layers import Conv1dMoE, Conv2dMoE


def _run(args: list[str], out: Path) -> dict[str, Any]:
    code = main([*args, "--out", str(out)])
    assert code == 0
    assert (out / "bench.md").is_file()
    return json.loads((out / "bench.json").read_text())


def _check_row_arithmetic(row: dict[str, Any]) -> None:
    """Everything a row reports follows from its own recorded samples."""
    assert row["repeats"] >= 5
    assert len(row["candidate_samples_s"]) == len(row["reference_samples_s"]) == row["repeats"]
    cand = statistics.median(row["candidate_samples_s"])
    ref = statistics.median(row["reference_samples_s"])
    assert row["candidate_s"] == pytest.approx(cand, rel=1e-12)
    assert row["reference_s"] == pytest.approx(ref, rel=1e-12)
    assert cand > 0 and ref > 0
    if row["metric"] == "time":
        assert row["candidate_value"] == pytest.approx(cand)
        assert row["reference_value"] == pytest.approx(ref)
    else:
        n = row["items_per_unit"]
        assert row["candidate_value"] == pytest.approx(n / cand)
        assert row["reference_value"] == pytest.approx(n / ref)
    assert row["ratio"] == pytest.approx(row["candidate_value"] / row["reference_value"])
    target = row["target"]
    value = row[target["of"]]
    if target["devices"] is not None and row["device"] not in target["devices"]:
        assert row["pass"] is None
    elif target["op"] == "<=":
        assert row["pass"] is (value <= target["value"])
    else:
        assert row["pass"] is (value >= target["value"])


def test_quick_layers_writes_consistent_json_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _run(["--quick", "--only", "a", "--device", "cpu", "--threads", "1"], tmp_path / "b1")

    env = report["environment"]
    for key in ("cpu_model", "cpu_count", "torch", "lightning", "cuda", "python"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert env["torch_threads"] == 1 and report["options"]["threads"] == 1
    assert report["options"]["only"] == ["a"] and report["errors"] == []

    rows = report["rows"]
    assert rows and {r["section"] for r in rows} == {"a"}
    for row in rows:
        _check_row_arithmetic(row)
        assert row["device"] == "cpu" and row["metric"] == "time"
        assert row["target"]["op"] == "<=" and row["target"]["value"] == pytest.approx(1.10)

    # The seed's MoE CNN on CIFAR (SPEC 1.3): four conv layers (in, H×W, filters, padding) and
    # the hidden dense 64·6·6 -> 512, all at batch 32 in quick mode.
    measured = {
        (
            r["layer"]["class"],
            r["layer"]["in"],
            tuple(r["layer"]["input_size"]),
            r["layer"]["out"],
            r["layer"]["padding"],
        )
        for r in rows
        if r["layer"]["dataset"] == "cifar10"
    }
    assert measured == {
        ("Conv2dMoE", 3, (32, 32), 32, "same"),
        ("Conv2dMoE", 32, (32, 32), 32, "valid"),
        ("Conv2dMoE", 32, (15, 15), 64, "same"),
        ("Conv2dMoE", 64, (15, 15), 64, "valid"),
        ("DenseMoE", 2304, (), 512, "valid"),
    }
    classes = {r["layer"]["class"] for r in rows}
    assert {"Conv1dMoE", "Conv3dMoE"} <= classes
    assert {r["batch"] for r in rows} == {32}
    # the network's first layer gets no input gradient, every other layer does
    first = [r for r in rows if r["layer"]["position"] == 1]
    assert first and not any(r["input_grad"] for r in first)
    assert all(r["input_grad"] for r in rows if r["layer"]["position"] > 1)

    table = (tmp_path / "b1" / "bench.md").read_text()
    assert sum(line.startswith("| a |") for line in table.splitlines()) == len(rows)
    assert "ratio" in table and "target" in table and env["cpu_model"] in table
    assert len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3
    assert "| a |" in capsys.readouterr().out  # the table is printed too


def test_cuda_without_cuda_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", "--only", "a", "--quick", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err
    assert not out.exists()


def test_existing_output_dir_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "bench.json").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "d", "--quick", "--device", "cpu", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "bench.json").read_text() == "keep me"


@pytest.mark.parametrize(
    "argv",
    [
        ["--only", "a,z"],
        ["--only", ""],
        ["--repeats", "3"],
        ["--device", "tpu"],
        ["--precision", "16"],
        ["--threads", "0"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_parse_args_defaults() -> None:
    options = parse_args([])
    assert options.only == ("a", "b", "c", "d", "e")
    assert (options.device, options.precision, options.quick, options.full) == (
        "auto",
        "32",
        False,
        False,
    )
    assert parse_args(["--only", "e,a,a"]).only == ("e", "a")


def test_interleave_alternates_order_and_discards_warmup() -> None:
    calls: list[str] = []

    def fake(tag: str):
        def run() -> float:
            calls.append(tag)
            return float(len(calls))  # the call's position, as its "measurement"

        return run

    samples = interleave(fake("c"), fake("r"), warmup=2, repeats=5)
    assert calls == ["c", "r"] * 2 + ["c", "r", "r", "c", "c", "r", "r", "c", "c", "r"]
    # only the timed calls' values are kept, each with its own side
    assert samples.candidate == [5.0, 8.0, 9.0, 12.0, 13.0]
    assert samples.reference == [6.0, 7.0, 10.0, 11.0, 14.0]
    assert samples.repeats == 5 and samples.warmup == 2


def test_make_row_ratios_and_targets() -> None:
    samples = PairSamples(candidate=[0.4, 0.1, 0.2], reference=[0.3, 0.5, 0.4], warmup=1)
    time_row = make_row(
        section="x",
        name="t",
        candidate="c",
        reference="r",
        samples=samples,
        metric="time",
        target=Target("<=", 0.6),
        device=torch.device("cpu"),
    )
    assert time_row["ratio"] == pytest.approx(0.2 / 0.4)
    assert time_row["pass"] is True
    rate_row = make_row(
        section="x",
        name="t",
        candidate="c",
        reference="r",
        samples=samples,
        metric="throughput",
        target=Target(">=", 2.5),
        device=torch.device("cpu"),
        items_per_unit=32,
    )
    assert rate_row["candidate_value"] == pytest.approx(32 / 0.2)
    assert rate_row["ratio"] == pytest.approx((32 / 0.2) / (32 / 0.4))  # = 2.0
    assert rate_row["pass"] is False
    gpu_only = make_row(
        section="x",
        name="t",
        candidate="c",
        reference="r",
        samples=samples,
        metric="time",
        target=Target("<=", 30.0, of="candidate_s", devices=("cuda",)),
        device=torch.device("cpu"),
    )
    assert gpu_only["pass"] is None
    with pytest.raises(ValueError, match="items_per_unit"):
        make_row(
            section="x",
            name="t",
            candidate="c",
            reference="r",
            samples=samples,
            metric="throughput",
            target=Target(">=", 1.0),
            device=torch.device("cpu"),
        )


@pytest.mark.parametrize(
    ("layer_cls", "ndim", "input_size", "kernel", "padding"),
    [
        (Conv2dMoE, 2, (9, 8), 3, "same"),
        (Conv2dMoE, 2, (9, 8), 4, "same"),  # odd Keras total: pad (1, 2)
        (Conv2dMoE, 2, (9, 8), 3, "valid"),
        (Conv1dMoE, 1, (11,), 5, "causal"),
    ],
)
def test_floor_does_the_layers_two_products(
    layer_cls: type, ndim: int, input_size: tuple[int, ...], kernel: int, padding: str
) -> None:
    """The floor's conv computes exactly the layer's expert pre-activations (same weights, same
    Keras padding) and its linear the gate logits: the same work, nothing more."""
    torch.manual_seed(0)
    in_ch, out_ch, k = 3, 4, 2
    layer = layer_cls(in_ch, out_ch, k, kernel, input_size, padding=padding)
    case = LayerCase("test", 1, ndim, in_ch, out_ch, (kernel,) * ndim, input_size, padding)
    floor = ConvMoEFloor(case, k)
    with torch.no_grad():
        floor.conv.weight.copy_(layer.expert_kernel)
        floor.conv.bias.copy_(layer.expert_bias.reshape(-1))
        floor.gate.weight.copy_(layer.gating_kernel.reshape(-1, out_ch * k).T)
        floor.gate.bias.copy_(layer.gating_bias.reshape(-1))
    x = torch.randn(2, in_ch, *input_size)
    hidden, logits = floor(x)

    # independent reference: Keras padding by hand (total = (out-1) + k - n for 'same', smaller
    # half before; k-1 before for 'causal'), then an unpadded convolution
    pads = []
    for _ in input_size:
        if padding == "same":
            total = max(kernel - 1, 0)
            pads += [total // 2, total - total // 2]
        elif padding == "causal":
            pads += [kernel - 1, 0]
        else:
            pads += [0, 0]
    conv = F.conv2d if ndim == 2 else F.conv1d
    expected = conv(F.pad(x, pads), layer.expert_kernel, layer.expert_bias.reshape(-1))
    torch.testing.assert_close(hidden, expected)
    assert hidden.shape[2:] == layer.output_size
    gate_expected = torch.einsum("bi,io->bo", x.reshape(2, -1), floor.gate.weight.T)
    torch.testing.assert_close(logits, gate_expected + layer.gating_bias.reshape(-1))


def test_routing_section_runs_or_skips_with_reason(tmp_path: Path) -> None:
    report = _run(["--quick", "--only", "d", "--device", "cpu", "--threads", "1"], tmp_path / "d")
    reason = routing_unsupported_reason()
    if reason is not None:
        assert report["rows"] == []
        assert [s["section"] for s in report["skipped"]] == ["d"]
        assert "top_k" in report["skipped"][0]["reason"]
        assert "skipped" in (tmp_path / "d" / "bench.md").read_text()
    else:
        assert report["rows"] and {r["section"] for r in report["rows"]} == {"d"}
        for row in report["rows"]:
            _check_row_arithmetic(row)
            assert row["target"]["value"] == pytest.approx(1.5)


def test_module_entry_point_help() -> None:
    proc = run_module("moe_lab.bench", "--help", cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--only", "--quick", "--device", "--precision", "--channels-last", "--full"):
        assert option in proc.stdout


@pytest.mark.slow
def test_quick_training_sections_on_cpu(tmp_path: Path) -> None:
    """b, c and e in quick mode: throughput rows whose ratios follow from their samples; e says
    that its run time is extrapolated."""
    report = _run(
        ["--quick", "--only", "b,c,e", "--device", "cpu", "--threads", "1"], tmp_path / "t"
    )
    assert report["errors"] == []
    rows = {r["section"]: r for r in report["rows"]}
    assert sorted(r["section"] for r in report["rows"]) == ["b", "b", "c", "e"]
    for row in report["rows"]:
        _check_row_arithmetic(row)
        assert row["metric"] == "throughput" and row["items_per_unit"] == 32
    assert {r["features"] for r in report["rows"] if r["section"] == "b"} == {False, True}
    assert rows["c"]["loader"] == "torch"
    assert rows["b"]["target"]["value"] == pytest.approx(0.95)
    e = rows["e"]
    assert "extrapolated from" in e["run_estimate"] and "extrapolated from" in e["note"]
    assert e["candidate_run_s"] > 0 and e["pass"] is None  # the 30 s target is for an H100


@pytest.mark.slow
def test_full_seed_run_is_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--full`` runs the protocol (here on a tiny CIFAR-shaped set) and reports measured run
    times, not extrapolated ones."""
    import moe_lab.bench.training as training

    monkeypatch.setattr(training, "CIFAR_TRAIN", 64)
    monkeypatch.setattr(training, "CIFAR_TEST", 32)
    report = _run(
        ["--quick", "--only", "e", "--full", "--device", "cpu", "--threads", "1"], tmp_path / "f"
    )
    (row,) = report["rows"]
    _check_row_arithmetic(row)
    assert row["run_estimate"].startswith("measured")
    assert "extrapolated" not in row["note"]
    assert row["candidate_run_s"] > 0 and row["reference_run_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_gpu_subset(tmp_path: Path) -> None:
    report = _run(["--quick", "--only", "a,c", "--device", "cuda"], tmp_path / "g")
    assert report["errors"] == []
    assert report["environment"]["gpu"]
    assert {r["section"] for r in report["rows"]} == {"a", "c"}
    for row in report["rows"]:
        assert row["device"] == "cuda"
        _check_row_arithmetic(row)
    c = next(r for r in report["rows"] if r["section"] == "c")
    assert c["loader"] == "resident" and c["target"]["value"] == pytest.approx(0.90)
