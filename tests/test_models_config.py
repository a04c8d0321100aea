"""conf/model/*.yaml: composed with the repo's experts and activation groups and a small data
config, then instantiated the way the training code does (``partial(input_shape=, num_classes=)``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moe_lab.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"
SHAPE = (1, 8, 8)
TOPOLOGY = {
    "blocks": [
        {"channels": [16, 16], "kernel_size": 3, "padding": ["same", "valid"], "pool": 2,
         "dropout": 0.25},
    ],
    "dense_units": 64,
    "dense_dropout": 0.5,
}  # fmt: skip
ROOT = """
defaults:
  - model: cnn
  - experts: k2
  - activation: relu_softmax
  - _self_
data:
  topology:
    blocks:
      - {channels: [16, 16], kernel_size: 3, padding: [same, valid], pool: 2, dropout: 0.25}
    dense_units: 64
    dense_dropout: 0.5
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conf")
    for group in ("model", "experts", "activation"):
        shutil.copytree(CONF / group, root / group)
    (root / "config.yaml").write_text(ROOT)
    return root


def make(config_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return (cfg, *instantiate(cfg.model)(input_shape=SHAPE, num_classes=10))


@pytest.mark.parametrize(
    ("overrides", "kind", "name", "n_experts"),
    [
        (["model=cnn"], "cnn", "cnn", None),
        (["model=moe", "experts=k4"], "moe", "moe", 4),
        (["model=cnn_matched"], "cnn_matched", "cnn_matched", 2),
        (["model=cnn_flop_matched"], "cnn_matched", "cnn_flop_matched", 2),
    ],
)
def test_model_configs_instantiate(config_dir, overrides, kind, name, n_experts):
    cfg, _model, facts = make(config_dir, overrides)
    info = facts
    assert (info.kind, info.name, info.n_experts) == (kind, name, n_experts)
    _direct, direct_facts = build_model(
        kind, SHAPE, 10, TOPOLOGY, n_experts=n_experts or 2, match=cfg.model.get("match", "params")
    )
    assert info.params == direct_facts.params
    assert isinstance(info.input_shape, list)
    if kind == "cnn_matched":
        expected_match = "flops" if name == "cnn_flop_matched" else "params"
        assert facts.match == expected_match
        assert abs(facts.match_achieved / facts.match_target - 1) <= 0.01


def test_activation_and_moe_kwargs_flow_from_their_groups(config_dir):
    _, model, facts = make(
        config_dir,
        ["model=moe", "activation=tanh_softmax", "+experts.moe_kwargs.use_expert_bias=false"],
    )
    for layer in model.moe_layers().values():
        assert layer.expert_activation.name == "tanh"
        assert layer.expert_bias is None
    assert facts.moe_kwargs == {"use_expert_bias": False}
    assert type(facts.moe_kwargs) is dict  # no OmegaConf objects in the info
