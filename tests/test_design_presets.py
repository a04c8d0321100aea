"""The published conv-MoE designs as experts presets (condconv, dynamic_conv, the top-k variants):
each composes to its paper's options and trains as a run; the gate temperature schedule (its
callback, its config check, its column in metrics.csv and in the loggers, its checkpoint)."""

from __future__ import annotations

import csv
import functools
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_train
from moe_lab.assembly import experts_callbacks
from moe_lab.config import ConfigError, compose_config, validate_train_config
from moe_lab.eval import load_weights
from moe_lab.lit import Classifier, GateTemperatureSchedule
from moe_lab.lit.temperature import scheduled_temperature
from moe_lab.models import ConvNet
from moe_lab.train import train

NEW_PRESETS = (
    "condconv",
    "dynamic_conv",
    "top2_of_8_aux_free",
    "top1_of_8_capacity",
    "shared1_top1_of_8",
)
RUN = [
    "experiment=mnist1d",
    "model=moe",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.accelerator=cpu",
    "logger=csv",
]
TOPOLOGY = {"blocks": [{"channels": [4], "kernel_size": 3, "pool": 2}], "dense_units": 8}


def experts(preset: str, tmp_path: Path) -> dict:
    cfg = compose_config([f"experts={preset}"], output_dir=tmp_path)
    return OmegaConf.to_container(cfg.experts, resolve=True)


def test_presets_are_the_published_designs(tmp_path: Path) -> None:
    cond = experts("condconv", tmp_path)
    assert cond["n_experts"] == 4 and cond["gating_activation"] == "sigmoid"
    assert cond["activation_placement"] == "after_mix"
    assert cond["moe_kwargs"] == {
        "gate_input": "pooled", "gate_groups": 1, "expert_backend": "kernel_mix",
    }  # fmt: skip
    dyn = experts("dynamic_conv", tmp_path)
    assert dyn["gating_activation"] == "softmax" and dyn["activation_placement"] == "after_mix"
    assert dyn["gate_temperature_schedule"] == {"start": 30.0, "end": 1.0, "epochs": 10}
    assert dyn["moe_kwargs"]["gate_hidden"] == 16 and dyn["moe_kwargs"]["gate_groups"] == 1
    free = experts("top2_of_8_aux_free", tmp_path)
    assert free["moe_kwargs"]["top_k"] == 2 and free["moe_kwargs"]["balance"] == "aux_free"
    assert free["moe_kwargs"]["balance_rate"] == 0.001
    assert free["aux_loss_weights"]["switch"] == 0.0
    cap = experts("top1_of_8_capacity", tmp_path)
    assert (cap["n_experts"], cap["moe_kwargs"]["top_k"]) == (8, 1)
    assert cap["moe_kwargs"]["capacity_factor"] == 1.25
    shared = experts("shared1_top1_of_8", tmp_path)
    assert shared["moe_kwargs"]["n_shared_experts"] == 1 and shared["moe_kwargs"]["top_k"] == 1
    # every other preset keeps the original's placement, init and no schedule (the _base)
    k2 = experts("k2", tmp_path)
    assert k2["activation_placement"] == "before_mix" and not k2["variance_preserving_init"]
    assert k2["gate_temperature_schedule"] is None and k2["gating_activation"] == "softmax"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_preset_trains_as_a_run(tmp_path: Path, data_dir: Path, preset: str) -> None:
    # dynamic_conv: 3 epochs, so that its temperature column shows the schedule
    epochs = 3 if preset == "dynamic_conv" else 1
    run_dir = tmp_path / "run"
    cfg = compose_train([*RUN, f"experts={preset}", f"trainer.max_epochs={epochs}"], run_dir,
                        data_dir)  # fmt: skip
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    rows = read_csv(run_dir / "metrics.csv")
    assert len(rows) == epochs
    if preset != "dynamic_conv":
        assert "gate_temperature" not in rows[0]
        return
    # 30 -> 1 over min(10, 3) epochs: 30, 15.5, 1 -- in metrics.csv and in the CSV logger's file
    expected = [scheduled_temperature(e, 30.0, 1.0, 10, epochs) for e in range(epochs)]
    assert expected == [30.0, 15.5, 1.0]
    assert [float(r["gate_temperature"]) for r in rows] == expected
    logged = [r for r in read_csv(run_dir / "csv" / "metrics.csv") if r.get("gate_temperature")]
    assert [float(r["gate_temperature"]) for r in logged] == expected
    # checkpoints keep the temperature their epoch was validated with
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(last["moe_lab_gate_temperature"].values()) == {1.0}


def test_eval_scores_a_checkpoint_at_its_temperature(tmp_path: Path) -> None:
    """moe_lab.eval loads the weights itself: it sets the checkpoint's temperature too."""
    net = ConvNet((1, 12), 3, TOPOLOGY, kind="moe", n_experts=2)
    module = Classifier(net, num_classes=3, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    saved: dict = {}
    for layer in net.moe_layers().values():
        layer.gate_temperature = 7.0
    module.on_save_checkpoint(saved)
    torch.save({"state_dict": module.state_dict(), **saved}, tmp_path / "x.ckpt")
    for layer in net.moe_layers().values():
        layer.gate_temperature = 1.0
    load_weights(module, tmp_path / "x.ckpt")
    assert {m.gate_temperature for m in net.moe_layers().values()} == {7.0}


def test_scheduled_temperature_is_linear_then_constant() -> None:
    taus = [scheduled_temperature(e, 30.0, 1.0, 10) for e in range(12)]
    assert taus[0] == 30.0 and taus[9] == taus[10] == taus[11] == 1.0
    steps = [a - b for a, b in itertools.pairwise(taus)]
    assert steps == pytest.approx([29 / 9] * 9 + [0, 0])
    assert scheduled_temperature(0, 30.0, 1.0, 10, max_epochs=1) == 1.0  # one epoch: the end
    assert scheduled_temperature(4, 30.0, 1.0, 10, max_epochs=-1) == pytest.approx(30 - 4 * 29 / 9)


def test_schedule_sets_every_moe_layer_and_records_the_epoch() -> None:
    net = ConvNet((1, 12), 3, TOPOLOGY, kind="moe", n_experts=2)
    module = Classifier(net, num_classes=3, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    callback = GateTemperatureSchedule(start=8, end=2, epochs=4)
    callback.on_train_epoch_start(SimpleNamespace(current_epoch=1, max_epochs=20), module)
    assert {m.gate_temperature for m in net.moe_layers().values()} == {6.0}
    assert module.epoch_values == {"gate_temperature": 6.0}
    # the checkpoint keeps the layers' temperature; loading it sets them back
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    callback.on_train_epoch_start(SimpleNamespace(current_epoch=3, max_epochs=20), module)
    assert net.features.block0_conv0.gate_temperature == 2.0
    module.on_load_checkpoint(checkpoint)
    assert {m.gate_temperature for m in net.moe_layers().values()} == {6.0}
    # a plain CNN has no MoE layer: nothing to set, no column
    plain = Classifier(ConvNet((1, 12), 3, TOPOLOGY), num_classes=3,
                       optimizer=functools.partial(torch.optim.SGD, lr=0.1))  # fmt: skip
    callback.on_train_epoch_start(SimpleNamespace(current_epoch=1, max_epochs=20), plain)
    assert plain.epoch_values == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 0, "end": 1, "epochs": 3}, "start must be a number > 0"),
        ({"start": 30, "end": float("inf"), "epochs": 3}, "end must be finite"),
        ({"start": 30, "end": 1, "epochs": 0}, "epochs must be a positive integer"),
    ],
)
def test_schedule_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GateTemperatureSchedule(**kwargs)


def test_the_experts_config_adds_the_schedule(tmp_path: Path) -> None:
    assert experts_callbacks(compose_config(["experts=k4"], output_dir=tmp_path)) == []
    (callback,) = experts_callbacks(compose_config(["experts=dynamic_conv"], output_dir=tmp_path))
    assert (callback.start, callback.end, callback.epochs) == (30.0, 1.0, 10)
    # any preset can use one
    cfg = compose_config(
        ["experts=top2_of_8", "experts.gate_temperature_schedule={start:4,end:1,epochs:3}"],
        output_dir=tmp_path,
    )
    validate_train_config(cfg)
    assert len(experts_callbacks(cfg)) == 1


@pytest.mark.parametrize(
    "schedule",
    ["{start:30,end:1}", "{start:-1,end:1,epochs:3}", "{start:30,end:1,epochs:2.5}", "30"],
)
def test_a_bad_schedule_is_a_config_error(tmp_path: Path, schedule: str) -> None:
    # from k4's null, so that the override replaces (a mapping would merge into dynamic_conv's)
    cfg = compose_config(
        ["experts=k4", f"experts.gate_temperature_schedule={schedule}"], output_dir=tmp_path
    )
    with pytest.raises(ConfigError, match=r"experts\.gate_temperature_schedule"):
        validate_train_config(cfg)


def test_a_run_recorded_before_the_design_keys_still_resumes(tmp_path: Path) -> None:
    """A record without the new keys (a run started before them) has the same experiment as the
    same config today, unless a new key is set to something else."""
    from moe_lab.config import RESUME_KEYS, _differences, _resolved

    def differences(overrides: list[str]) -> list[str]:
        current = compose_config(overrides, output_dir=tmp_path)
        old = OmegaConf.create(OmegaConf.to_container(current, resolve=True))
        for key in ("activation_placement", "variance_preserving_init", "gating_activation",
                    "gate_temperature_schedule"):  # fmt: skip
            old.experts.pop(key)
        for key in ("activation_placement", "variance_preserving_init"):
            old.model.pop(key)
        old.data.topology.pop("batch_norm")
        now = compose_config(overrides, output_dir=tmp_path)
        return [
            d
            for k in RESUME_KEYS
            for d in _differences(_resolved(old.get(k)), _resolved(now.get(k)), k)
        ]

    assert differences(["experts=k4"]) == []
    assert differences(["experts=k4", "data.topology.batch_norm=true"]) == [
        "data.topology.batch_norm: None -> True"
    ]


@pytest.mark.slow
def test_the_designs_comparison_runs_each_design_as_an_arm(tmp_path: Path) -> None:
    """``experiment=mnist1d_designs`` at a tiny budget: every design is an arm, each searches its
    own knobs, the matched CNNs match the CondConv arm, and the report plots accuracy against
    FLOPs and names each verdict's axis against the FLOP-matched baseline."""
    import json

    import optuna
    import pandas as pd

    from conftest import run_module

    proc = run_module(
        "moe_lab.compare", "experiment=mnist1d_designs", "compare.trials=1", "compare.seeds=2",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "logger=csv", f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'out'}", cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (marker,) = (tmp_path / "out" / "compare").glob("*/*/comparison.json")
    comparison = marker.parent
    arm_keys = json.loads(marker.read_text())["settings"]["arm_keys"]
    assert "experts.gate_temperature_schedule.end" in arm_keys["dynamic_conv"]
    assert "experts.moe_kwargs.balance_rate" in arm_keys["top2_of_8_aux_free"]
    for arm in ("cnn", "moe", "condconv", "cnn_flop_matched"):
        assert not {k for k in arm_keys[arm] if k.startswith("experts.")}, arm
    storage = f"sqlite:///{comparison / 'study.db'}"
    assert len(optuna.get_all_study_summaries(storage=storage)) == 7
    summary = pd.read_csv(comparison / "summary.csv").set_index("arm")
    assert (summary["final_n"] == 2).all()
    ratio = (
        summary.loc["cnn_flop_matched", "flops_per_example"]
        / summary.loc["condconv", "flops_per_example"]
    )
    assert abs(ratio - 1) < 0.03
    report = (comparison / "report.md").read_text()
    assert "- condconv" in report and "vs cnn_flop_matched" in report
    assert (comparison / "accuracy_vs_flops.png").is_file()
