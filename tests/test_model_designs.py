"""The conv-MoE designs on the model side: the activation after the mix (CondConv, DynamicConv),
BatchNorm in every model alike, the variance-preserving expert init, and matched baselines that
match the experts config they are given."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from moe_lab.config import compose_config
from moe_lab.layers import Conv1dMoE, DenseMoE
from moe_lab.models import ConvNet, build_model, count_params
from moe_lab.models.variance import expected_gate_square_sum, variance_preserving_scale

SHAPE = (1, 40)
TOPOLOGY = {
    "blocks": [{"channels": [6, 8], "kernel_size": 5, "padding": ["same", "valid"], "pool": 2,
                "dropout": 0.25}],
    "dense_units": 12,
    "dense_dropout": 0.5,
}  # fmt: skip
MOE = dict(n_experts=3, expert_activation="relu", gating_activation="softmax")


def with_bn(batch_norm: bool) -> dict:
    return {**TOPOLOGY, "batch_norm": batch_norm}


class Reference(nn.Module):
    """The after-mix MoE twin built by hand: linear-expert MoE layers, then [BN,] ReLU."""

    def __init__(self, batch_norm: bool, **layer) -> None:
        super().__init__()
        features: OrderedDict[str, nn.Module] = OrderedDict()
        for j, (c_in, c_out, size, pad) in enumerate([(1, 6, 40, "same"), (6, 8, 40, "valid")]):
            features[f"block0_conv{j}"] = Conv1dMoE(
                c_in, c_out, kernel_size=5, input_size=size, padding=pad, **layer
            )
            if batch_norm:
                features[f"block0_bn{j}"] = nn.BatchNorm1d(c_out)
            features[f"block0_act{j}"] = nn.ReLU()
        features["block0_pool"] = nn.MaxPool1d(2, stride=2)
        features["block0_dropout"] = nn.Dropout(0.25)
        self.features = nn.Sequential(features)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                dense=DenseMoE(8 * 18, 12, **layer),
                act=nn.ReLU(),
                dropout=nn.Dropout(0.5),
                head=nn.Linear(12, 10),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_after_mix_is_linear_experts_then_the_blocks_activation(batch_norm: bool) -> None:
    torch.manual_seed(0)
    net = ConvNet(SHAPE, 10, with_bn(batch_norm), kind="moe", activation_placement="after_mix",
                  moe_kwargs={"gate_input": "pooled"}, **MOE)  # fmt: skip
    for layer in net.moe_layers().values():
        assert layer.expert_activation.is_identity  # the experts are linear
    reference = Reference(batch_norm, n_experts=3, expert_activation=None,
                          gating_activation="softmax", gate_input="pooled")  # fmt: skip
    reference.load_state_dict(net.state_dict())  # same names, same shapes
    assert list(dict(net.named_modules())) == list(dict(reference.named_modules()))
    x = torch.randn(5, *SHAPE)
    for mode in (True, False):  # train (batch statistics, dropout) and eval
        net.train(mode), reference.train(mode)
        torch.manual_seed(1)
        ours = net(x)
        torch.manual_seed(1)
        torch.testing.assert_close(ours, reference(x), rtol=0, atol=0)
    # and it differs from the original's activation-before-mix
    torch.manual_seed(0)
    before = ConvNet(SHAPE, 10, with_bn(batch_norm), kind="moe",
                     moe_kwargs={"gate_input": "pooled"}, **MOE).eval()  # fmt: skip
    before.load_state_dict(net.state_dict())
    assert not torch.allclose(before(x), net.eval()(x))


def test_kernel_mix_needs_the_activation_after_the_mix() -> None:
    kernel_mix = {"expert_backend": "kernel_mix", "gate_input": "pooled", "gate_groups": 1}
    with pytest.raises(ValueError, match="kernel_mix"):
        ConvNet(SHAPE, 10, TOPOLOGY, kind="moe", moe_kwargs=kernel_mix, **MOE)
    net = ConvNet(SHAPE, 10, TOPOLOGY, kind="moe", moe_kwargs=kernel_mix,
                  activation_placement="after_mix", **MOE)  # fmt: skip
    assert net(torch.randn(2, *SHAPE)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation_placement": "inside"}, "activation_placement must be one of"),
        ({"activation_placement": "after_mix", "expert_activation": "softmax"}, "elementwise"),
        ({"variance_preserving_init": "yes"}, "variance_preserving_init must be"),
    ],
)
def test_bad_design_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConvNet(SHAPE, 10, TOPOLOGY, kind="moe", **{**MOE, **kwargs})


def test_topology_batch_norm_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"topology\.batch_norm must be true or false"):
        ConvNet(SHAPE, 10, {**TOPOLOGY, "batch_norm": "yes"})


@pytest.mark.parametrize("kind", ["cnn", "moe", "cnn_matched"])
def test_defaults_are_bit_identical_to_the_original_twin(kind: str) -> None:
    """batch_norm false (given or absent), activation before the mix and no variance-preserving
    init build the same modules, draw the same weights and compute the same logits."""
    x = torch.randn(4, *SHAPE)
    outputs, states = [], []
    for topology, extra in [
        (TOPOLOGY, {}),
        (with_bn(False), {"activation_placement": "before_mix", "variance_preserving_init": False}),
    ]:
        torch.manual_seed(0)
        net, _ = build_model(kind, SHAPE, 10, topology, match_tolerance=0.1, **MOE, **extra)
        names = [n for n, _ in net.named_modules()]
        assert not any("_bn" in n or "_act" in n or n.endswith(".act") for n in names)
        states.append(net.state_dict())
        outputs.append(net.eval()(x))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("kind", ["cnn", "moe"])
def test_batch_norm_follows_every_conv_before_its_activation(kind: str) -> None:
    extra = {"activation_placement": "after_mix"} if kind == "moe" else {}
    plain = ConvNet(SHAPE, 10, TOPOLOGY, kind=kind, **MOE, **extra)
    net = ConvNet(SHAPE, 10, with_bn(True), kind=kind, **MOE, **extra)
    names = list(net.features._modules)
    act = "relu" if kind == "cnn" else "act"
    for j, channels in enumerate([6, 8]):
        conv, bn = names.index(f"block0_conv{j}"), names.index(f"block0_bn{j}")
        assert bn == conv + 1 and names[bn + 1] == f"block0_{act}{j}"
        assert isinstance(net.features[bn], nn.BatchNorm1d)
        assert net.features[bn].num_features == channels
    assert not any("bn" in n for n in net.classifier._modules)  # convs only
    # its 2 parameters per channel are counted
    assert count_params(net) == count_params(plain) + 2 * (6 + 8)
    assert net(torch.randn(3, *SHAPE)).shape == (3, 10)


def test_before_mix_moe_gets_batch_norm_after_the_layer() -> None:
    net = ConvNet(SHAPE, 10, with_bn(True), kind="moe", **MOE)
    names = list(net.features._modules)
    assert names[:4] == ["block0_conv0", "block0_bn0", "block0_conv1", "block0_bn1"]


@pytest.mark.parametrize("match", ["params", "flops"])
def test_matched_cnn_with_batch_norm_matches_the_moe_with_batch_norm(match: str) -> None:
    topology = {**with_bn(True), "blocks": [{**TOPOLOGY["blocks"][0], "channels": [32, 32]}],
                "dense_units": 64}  # fmt: skip
    _, moe = build_model("moe", SHAPE, 10, topology, **MOE)
    net, matched = build_model("cnn_matched", SHAPE, 10, topology, match=match, **MOE)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net.modules()) == 2
    key = "params" if match == "params" else "flops_per_example"
    assert matched.match_target == getattr(moe, key)
    assert abs(getattr(matched, key) - getattr(moe, key)) <= 0.01 * getattr(moe, key)


# -- variance-preserving init -----------------------------------------------------------------


def output_std(layer: str, n_experts: int, vp: bool, moe_kwargs: dict, **net) -> float:
    """The MoE layer's output std at init on unit-variance random inputs, over 3 draws."""
    topology = {"blocks": [{"channels": [32, 32], "kernel_size": 5,
                            "padding": ["same", "valid"], "pool": 2}], "dense_units": 64}  # fmt: skip
    stds = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = ConvNet(SHAPE, 10, topology, kind="moe", n_experts=n_experts,
                        variance_preserving_init=vp, moe_kwargs=moe_kwargs, **net)  # fmt: skip
        module = dict(model.named_modules())[layer]
        x = torch.randn(128, 32, 40) if "conv" in layer else torch.randn(128, module.in_features)
        with torch.no_grad():
            stds.append(module(x).std())
    return float(torch.stack(stds).mean())


DESIGNS = {
    "k8": (8, {}, {}),
    "k8_pooled": (8, {"gate_input": "pooled"}, {}),
    "condconv": (4, {"gate_input": "pooled", "gate_groups": 1, "expert_backend": "kernel_mix"},
                 {"gating_activation": "sigmoid", "activation_placement": "after_mix"}),
    "top2_of_8": (8, {"top_k": 2, "gate_input": "pooled"}, {}),
    "top1_of_8": (8, {"top_k": 1}, {}),
    "shared1_top1_of_8": (8, {"top_k": 1, "gate_input": "pooled", "n_shared_experts": 1}, {}),
}  # fmt: skip


@pytest.mark.parametrize("layer", ["features.block0_conv1", "classifier.dense"])
@pytest.mark.parametrize("design", sorted(DESIGNS))
def test_variance_preserving_init_keeps_one_experts_output_std(layer: str, design: str) -> None:
    n_experts, moe_kwargs, net = DESIGNS[design]
    net = {"expert_activation": "relu", "gating_activation": "softmax", **net}
    # one expert: K=1 under a softmax gate (g = 1), with the design's activation placement
    gate_input = {"gate_input": moe_kwargs.get("gate_input", "full")}
    single = output_std(layer, 1, False, gate_input, **{**net, "gating_activation": "softmax"})
    with_option = output_std(layer, n_experts, True, moe_kwargs, **net)
    without = output_std(layer, n_experts, False, moe_kwargs, **net)
    assert with_option == pytest.approx(single, rel=0.25)
    if design in ("condconv", "shared1_top1_of_8"):
        # 4 sigmoid gates of about 0.5 (sum g^2 = 4/4), or a shared expert beside a top-1 gate of
        # about 1/8 (1 + 1/64): these mixtures keep about one expert's variance already
        assert without == pytest.approx(single, rel=0.25)
    elif design == "k8_pooled" and "conv" in layer:
        # near-even gates (the pooled logits are small): averaging K experts divides the std by
        # sqrt(K). (The dense layer's gate reads its whole input: its gates are less even.)
        assert without == pytest.approx(single / n_experts**0.5, rel=0.15)
    else:
        assert without < 0.8 * single


def test_variance_preserving_scale_is_sqrt_k_for_even_softmax_gates() -> None:
    assert expected_gate_square_sum(8, "softmax") == pytest.approx(1 / 8)
    assert expected_gate_square_sum(8, "softmax", top_k=2) == pytest.approx(1 / 2)
    assert expected_gate_square_sum(8, "softmax", top_k=1) == pytest.approx(1 / 64)
    assert expected_gate_square_sum(4, "sigmoid") == pytest.approx(1.0)
    assert variance_preserving_scale(8, "softmax", {}, 0.0) == pytest.approx(8**0.5)
    assert variance_preserving_scale(8, "softmax", {"top_k": 1, "n_shared_experts": 1}, 0.0) == (
        pytest.approx((1 + 1 / 64) ** -0.5)
    )
    # spread logits make uneven gates, whose mixture keeps more variance
    assert expected_gate_square_sum(8, "softmax", logit_std=1.0) > 1.5 / 8


def test_variance_preserving_init_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="sets expert_kernel_initializer_scale itself"):
        ConvNet(SHAPE, 10, TOPOLOGY, kind="moe", variance_preserving_init=True,
                moe_kwargs={"expert_kernel_initializer_scale": 2.0}, **MOE)  # fmt: skip
    with pytest.raises(ValueError, match="zero gates"):
        variance_preserving_scale(4, "relu", {}, 0.0)


def test_variance_preserving_init_draws_the_same_random_numbers() -> None:
    """Only the experts' scale changes: the gates are the same draws."""
    nets = []
    for vp in (False, True):
        torch.manual_seed(0)
        nets.append(ConvNet(SHAPE, 10, TOPOLOGY, kind="moe", variance_preserving_init=vp, **MOE))
    plain, scaled = (dict(n.named_parameters()) for n in nets)
    assert torch.equal(plain["features.block0_conv0.gating_kernel"],
                       scaled["features.block0_conv0.gating_kernel"])  # fmt: skip
    ratio = (
        scaled["features.block0_conv0.expert_kernel"] / plain["features.block0_conv0.expert_kernel"]
    )
    assert torch.allclose(ratio, ratio.flatten()[0]) and float(ratio.flatten()[0].detach()) > 1


# -- matched baselines per arm ------------------------------------------------------------------


@pytest.mark.parametrize("matched", ["cnn_matched", "cnn_flop_matched"])
def test_matched_cnn_matches_the_experts_config_it_is_given(tmp_path, matched: str) -> None:
    """[model=cnn_flop_matched, experts=condconv] matches the condconv MoE twin, not a K=2 one."""
    facts = {}
    for model in ("moe", matched):
        cfg = compose_config([f"model={model}", "experts=condconv", "data=mnist1d"],
                             output_dir=tmp_path)  # fmt: skip
        _, facts[model] = instantiate(cfg.model, _convert_="all")(input_shape=SHAPE, num_classes=10)
    moe, cnn = facts["moe"], facts[matched]
    key = "params" if cnn.match == "params" else "flops_per_example"
    assert cnn.n_experts == 4 and cnn.moe_kwargs["gate_groups"] == 1
    assert cnn.match_target == getattr(moe, key)
    assert abs(getattr(cnn, key) - getattr(moe, key)) <= 0.01 * getattr(moe, key)


@pytest.mark.parametrize("matched", ["cnn_matched", "cnn_flop_matched"])
def test_matched_cnn_of_a_variance_preserving_moe_builds(tmp_path, matched: str) -> None:
    """The matched CNN sizes itself on its MoE twin built on the meta device; the init's Monte
    Carlo runs on the host whatever the default device (it once called .item() on meta)."""
    overrides = [f"model={matched}", "experts=dynamic_conv", "data=mnist1d",
                 "experts.variance_preserving_init=true"]  # fmt: skip
    cfg = compose_config(overrides, output_dir=tmp_path)
    _, facts = instantiate(cfg.model, _convert_="all")(input_shape=SHAPE, num_classes=10)
    assert facts.match_target > 0
    with torch.device("meta"):
        on_meta = expected_gate_square_sum(4, "softmax", None, 0.5)
    assert on_meta == expected_gate_square_sum(4, "softmax", None, 0.5)
