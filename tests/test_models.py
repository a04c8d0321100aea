"""moe_lab.models: the seed CNN / MoE builder, parameter and FLOP counts, width matching.

Parameter and FLOP counts are checked against per-layer formulas written out here (SPEC 1.2 and
1.3), walking the spatial size with Keras' length formulas, never against the builder's own path.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE, MoEBase
from moe_lab.models import (
    ConvNet,
    WidthMatchError,
    build_model,
    count_flops,
    count_params,
    match_width,
    parse_topology,
)

# -- topologies ---------------------------------------------------------------------------------


def block(channels, kernel_size=3, padding=("same", "valid"), pool=2, dropout=0.25):
    return {
        "channels": list(channels),
        "kernel_size": kernel_size,
        "padding": list(padding),
        "pool": pool,
        "dropout": dropout,
    }


CIFAR_SHAPE = (3, 32, 32)
CIFAR_TOPOLOGY = {
    "blocks": [block([32, 32]), block([64, 64])],
    "dense_units": 512,
    "dense_dropout": 0.5,
}
MNIST1D_SHAPE = (1, 40)
MNIST1D_TOPOLOGY = {
    "blocks": [block([32, 32], kernel_size=5), block([64, 64], kernel_size=5)],
    "dense_units": 256,
    "dense_dropout": 0.5,
}
DIGITS_SHAPE = (1, 8, 8)
DIGITS_TOPOLOGY = {"blocks": [block([16, 16])], "dense_units": 64, "dense_dropout": 0.5}
VOLUME_SHAPE = (1, 8, 16, 16)
VOLUME_TOPOLOGY = {
    "blocks": [block([8, 8]), block([16, 16], padding=("same", "same"), pool=[1, 2, 2])],
    "dense_units": 64,
    "dense_dropout": 0.5,
}
CASES = {
    "cifar": (CIFAR_SHAPE, CIFAR_TOPOLOGY),
    "mnist1d": (MNIST1D_SHAPE, MNIST1D_TOPOLOGY),
    "digits": (DIGITS_SHAPE, DIGITS_TOPOLOGY),
    "volume3d": (VOLUME_SHAPE, VOLUME_TOPOLOGY),
}


# -- independent references ---------------------------------------------------------------------


def keras_length(n: int, k: int, padding: str) -> int:
    """Stride-1 Keras conv output length (SPEC 1.2)."""
    return {"valid": n - k + 1, "same": n}[padding]


def reference_params(
    kind, input_shape, num_classes, topology, n_experts=2, gating_bias=True, multiplier=1.0
):
    """Sum of the SPEC's per-layer parameter formulas, for kind 'cnn' or 'moe'."""

    def width(w):  # round half up, at least 1
        return max(1, math.floor(w * multiplier + 0.5))

    K = n_experts
    channels, size = input_shape[0], list(input_shape[1:])
    ndim = len(size)
    total = 0
    for blk in topology["blocks"]:
        k = blk["kernel_size"]
        for out, pad in zip(blk["channels"], blk["padding"], strict=True):
            out = width(out)
            if kind == "cnn":
                total += channels * out * k**ndim + out  # kernel + bias
            else:
                total += channels * out * K * k**ndim  # expert kernels
                total += out * K  # expert biases
                total += channels * math.prod(size) * out * K  # gating kernel: whole input volume
                total += out * K if gating_bias else 0
            size = [keras_length(n, k, pad) for n in size]
            channels = out
        pool = blk["pool"]
        pools = pool if isinstance(pool, list) else [pool] * ndim
        size = [n // p for n, p in zip(size, pools, strict=True)]
    flat = channels * math.prod(size)
    dense = width(topology["dense_units"])
    if kind == "cnn":
        total += flat * dense + dense
    else:
        total += flat * dense * K + dense * K + flat * K + (K if gating_bias else 0)
    return total + dense * num_classes + num_classes


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- exact counts on the seed's CIFAR-10 networks ---------------------------------------------------


@pytest.mark.parametrize(("kind", "seed_count"), [("cnn", 1_250_858), ("moe", 7_560_140)])
def test_cifar_param_counts_are_the_seeds(kind, seed_count):
    model, facts = build_model(kind, CIFAR_SHAPE, 10, CIFAR_TOPOLOGY, n_experts=2)
    assert trainable(model) == seed_count  # SPEC 1.3
    assert reference_params(kind, CIFAR_SHAPE, 10, CIFAR_TOPOLOGY, n_experts=2) == seed_count
    assert facts.params == seed_count


def test_cifar_moe_second_conv_gating_weights():
    model, _facts = build_model("moe", CIFAR_SHAPE, 10, CIFAR_TOPOLOGY, n_experts=2)
    assert model.features.block0_conv1.gating_kernel.numel() == 2_097_152  # SPEC 1.3
    assert model.features.block0_conv0.gating_kernel.numel() == 32 * 32 * 3 * 32 * 2  # SPEC 1.2


# -- 1D / 2D / 3D ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cnn", "moe"])
@pytest.mark.parametrize("case", ["mnist1d", "digits", "volume3d"])
def test_builds_forward_and_counts_in_1d_2d_3d(case, kind):
    shape, topology = CASES[case]
    torch.manual_seed(0)
    model, _facts = build_model(kind, shape, 7, topology, n_experts=3)
    assert trainable(model) == reference_params(kind, shape, 7, topology, n_experts=3)
    conv_moe = {1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}[len(shape) - 1]
    n_conv_moe = sum(isinstance(m, conv_moe) for m in model.modules())
    assert n_conv_moe == (
        sum(len(b["channels"]) for b in topology["blocks"]) if kind == "moe" else 0
    )

    x = torch.rand(4, *shape)
    model.train()
    logits = model(x)
    assert logits.shape == (4, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_moe_twin_structure():
    model, _facts = build_model(
        "moe", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, n_experts=4, expert_activation="tanh"
    )
    # the MoE layers' expert activation replaces the ReLU; the head stays plain
    assert not any(
        isinstance(m, (nn.ReLU, nn.Conv2d, nn.Conv1d, nn.Conv3d)) for m in model.modules()
    )
    assert isinstance(model.classifier.dense, DenseMoE)
    assert isinstance(model.classifier.head, nn.Linear)
    layers = model.moe_layers()
    assert list(layers) == ["features.block0_conv0", "features.block0_conv1", "classifier.dense"]
    for layer in layers.values():
        assert layer.n_experts == 4
        assert layer.expert_activation.name == "tanh"
        assert layer.gating_activation.name == "softmax"
    # the conv MoE layers are told the spatial size they see: 8 -> same 8 -> valid 6
    assert model.features.block0_conv0.input_size == (8, 8)
    assert model.features.block0_conv1.input_size == (8, 8)
    assert model.features.block0_conv1.output_size == (6, 6)


def test_cnn_structure_follows_the_keras_seed():
    model, _facts = build_model("cnn", CIFAR_SHAPE, 10, CIFAR_TOPOLOGY)
    kinds = [type(m).__name__ for m in model.features]
    block_layers = ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Dropout"]
    assert kinds == block_layers * 2
    assert [type(m).__name__ for m in model.classifier] == [
        "Flatten", "Linear", "ReLU", "Dropout", "Linear",
    ]  # fmt: skip
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.25, 0.25, 0.5]
    assert model.classifier.dense.in_features == 64 * 6 * 6


def test_moe_kwargs_reach_every_moe_layer():
    model, facts = build_model(
        "moe", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, moe_kwargs={"use_gating_bias": False}
    )
    assert all(layer.gating_bias is None for layer in model.moe_layers().values())
    expected = reference_params("moe", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, gating_bias=False)
    assert trainable(model) == expected
    assert facts.moe_kwargs == {"use_gating_bias": False}


def test_moe_kwargs_may_not_override_the_builder():
    with pytest.raises(ValueError, match="input_size"):
        build_model("moe", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, moe_kwargs={"input_size": 4})


# -- Keras padding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "kernel", "pads"),
    [
        ((1, 10), 4, (1, 2)),  # total k - 1 = 3: 1 before, 2 after
        ((1, 9, 7), 2, (0, 1, 0, 1)),  # total 1 per dim: 0 before, 1 after
        ((2, 6, 5), [[3, 4]], (1, 2, 1, 1)),  # W: k=4 -> (1, 2); H: k=3 -> (1, 1)
    ],
)
def test_same_padding_is_keras_for_even_kernels(shape, kernel, pads):
    """Keras 'same': total padding k - 1, the smaller half before. ``pads`` is written out by
    hand in F.pad order (last dim first)."""
    topology = {
        "blocks": [{"channels": [3], "kernel_size": kernel, "padding": "same"}],
        "dense_units": 4,
    }
    model, _facts = build_model("cnn", shape, 2, topology, init="torch")
    conv = next(m for m in model.features if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    x = torch.randn(2, *shape)
    conv_fn = F.conv1d if len(shape) == 2 else F.conv2d
    expected = torch.relu(conv_fn(F.pad(x, pads), conv.weight, conv.bias))
    assert expected.shape[2:] == x.shape[2:]
    torch.testing.assert_close(model.features(x), expected)


# -- width multiplier, too-deep topologies, bad input -------------------------------------------------


@pytest.mark.parametrize(
    ("multiplier", "widths"),
    [(0.5, [16, 16, 32, 32, 256]), (1.3, [42, 42, 83, 83, 666]), (1e-3, [1, 1, 1, 1, 1])],
)
def test_width_multiplier_scales_convs_and_dense(multiplier, widths):
    model, facts = build_model("cnn", CIFAR_SHAPE, 10, CIFAR_TOPOLOGY, width_multiplier=multiplier)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [*convs, model.classifier.dense.out_features] == widths
    expected = reference_params("cnn", CIFAR_SHAPE, 10, CIFAR_TOPOLOGY, multiplier=multiplier)
    assert trainable(model) == expected
    assert facts.width_multiplier == multiplier


@pytest.mark.parametrize("kind", ["cnn", "moe"])
def test_too_deep_topology_is_a_clear_error(kind):
    deep = {"blocks": [block([8, 8]), block([8, 8]), block([8, 8])], "dense_units": 16}
    # (8, 8) -> same 8 -> valid 6 -> pool 3 -> same 3 -> valid 1 -> pool 0
    with pytest.raises(
        ValueError, match=r"block 1 max-pool .*\(1, 1\) to \(0, 0\).*data\.topology"
    ):
        build_model(kind, DIGITS_SHAPE, 10, deep)
    with pytest.raises(ValueError, match=r"block 0 conv 0 .*\(2,\) to \(-2,\)"):
        build_model(
            kind, (1, 2), 10, {"blocks": [block([4], 5, ["valid"], None)], "dense_units": 4}
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "transformer"}, "kind must be one of"),
        ({"init": "xavier"}, "init must be one of"),
        ({"match": "time"}, "match must be one of"),
        ({"input_shape": (3, 2, 2, 2, 2)}, "1 to 3 positive spatial sizes"),
        ({"topology": {"blocks": [], "dense_units": 8, "depth": 3}}, "unknown keys"),
        ({"topology": {"blocks": [{"channels": [4]}], "dense_units": 8}}, "needs 'kernel_size'"),
        (
            {"topology": {"blocks": [block([4, 4], padding=["same"])], "dense_units": 8}},
            "lists 1 entries but the block has 2 convs",
        ),
        ({"topology": {"blocks": [block([4], padding=["causal"])], "dense_units": 8}}, "1D"),
        ({"topology": {"blocks": [block([4, 0])], "dense_units": 8}}, r"channels\[1\]"),
        ({"topology": {"blocks": [], "dense_units": 8, "dense_dropout": 1.0}}, r"in \[0, 1\)"),
        ({"width_multiplier": 0}, "width_multiplier"),
        ({"kind": "cnn_matched", "width_multiplier": 2.0}, "searches the width multiplier"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message):
    args = {"kind": "cnn", "input_shape": DIGITS_SHAPE, "topology": DIGITS_TOPOLOGY} | kwargs
    with pytest.raises(ValueError, match=message):
        build_model(args.pop("kind"), args.pop("input_shape"), 10, args.pop("topology"), **args)


def test_forward_rejects_the_wrong_input_size():
    model, _facts = build_model("cnn", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY)
    with pytest.raises(ValueError, match=r"input_shape=\(1, 9, 9\)"):
        model(torch.zeros(2, 1, 9, 9))


# -- init --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["features.block1_conv1", "classifier.dense"])
def test_keras_init_is_glorot_uniform_with_zero_bias(path):
    torch.manual_seed(0)
    module = build_model("cnn", CIFAR_SHAPE, 10, CIFAR_TOPOLOGY).net.get_submodule(path)
    w = module.weight.detach()
    if isinstance(module, nn.Conv2d):  # (64, 64, 3, 3)
        fan_in, fan_out = 64 * 9, 64 * 9
    else:  # Linear (512, 2304)
        fan_in, fan_out = 2304, 512
    limit = math.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= limit
    assert w.abs().max() > 0.99 * limit
    assert w.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.02)  # U(-a, a): a/sqrt(3)
    assert w.mean().abs().item() < 0.02 * limit
    assert torch.all(module.bias == 0)


def test_torch_init_keeps_pytorch_defaults():
    torch.manual_seed(0)
    conv = build_model(
        "cnn", CIFAR_SHAPE, 10, CIFAR_TOPOLOGY, init="torch"
    ).net.features.block1_conv1
    bound = 1 / math.sqrt(64 * 9)  # kaiming_uniform(a=sqrt(5)) and the bias both use 1/sqrt(fan_in)
    assert conv.weight.abs().max() <= bound
    assert conv.bias.abs().max() > 0
    assert conv.bias.abs().max() <= bound


def test_moe_layers_keep_their_own_init():
    torch.manual_seed(0)
    layer = build_model(
        "moe", CIFAR_SHAPE, 10, CIFAR_TOPOLOGY, init="keras"
    ).net.features.block1_conv1
    # seed conv MoE init: expert_kernel ~ N(0, 1 / (C * k^2)) with C = 64, not Glorot
    assert layer.expert_kernel.std().item() == pytest.approx(1 / math.sqrt(64 * 9), rel=0.03)


# -- FLOPs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "topology", "expected"),
    [
        # (1, 12): conv 1->4 k3 same (12 positions), conv 4->5 k3 valid (10), pool 2 -> 5;
        # dense 25 -> 6; head 6 -> 3. Two FLOPs per multiply-add, biases not counted.
        (
            (1, 12),
            {"blocks": [block([4, 5], pool=2)], "dense_units": 6},
            2 * (12 * 4 * 1 * 3 + 10 * 5 * 4 * 3 + 25 * 6 + 6 * 3),
        ),
        # (2, 6, 7): conv 2->3 k2 same (6x7), pool 2 -> 3x3; dense 27 -> 4; head 4 -> 3.
        (
            (2, 6, 7),
            {"blocks": [block([3], kernel_size=2, padding=["same"])], "dense_units": 4},
            2 * (42 * 3 * 2 * 4 + 27 * 4 + 4 * 3),
        ),
    ],
)
def test_count_flops_matches_the_formula_for_a_tiny_cnn(shape, topology, expected):
    model, _facts = build_model("cnn", shape, 3, topology)
    model.train()
    assert count_flops(model, shape) == expected
    assert model.training  # mode restored


def test_count_flops_of_a_tiny_moe_is_its_matmuls_and_convs():
    """Expert convs (out*K channels), gating matmuls over the whole input, dense experts; only
    the final mixing (at most 2 * out * K per output position) may be counted on top."""
    shape, K = (1, 12), 2
    topology = {"blocks": [block([4, 5], pool=2)], "dense_units": 6}
    model, _facts = build_model("moe", shape, 3, topology, n_experts=K)
    convs = 2 * (12 * 4 * K * 1 * 3 + 10 * 5 * K * 4 * 3)
    gates = 2 * (1 * 12 * 4 * K + 4 * 12 * 5 * K + 25 * K)
    dense = 2 * (25 * 6 * K + 6 * 3)
    mixing = 2 * (12 * 4 * K + 10 * 5 * K + 6 * K)
    assert convs + gates + dense <= count_flops(model, shape) <= convs + gates + dense + mixing


def test_count_flops_on_the_meta_device_equals_the_real_count():
    real, _real_facts = build_model("moe", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY)
    with torch.device("meta"):
        meta = ConvNet(DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, kind="moe")
    assert count_flops(meta, DIGITS_SHAPE) == count_flops(real, DIGITS_SHAPE)
    assert count_params(meta) == trainable(real)


# -- matching -------------------------------------------------------------------------------------

MATCH_CASES = [("cifar", 2), ("cifar", 4), ("mnist1d", 2), ("digits", 2), ("volume3d", 2)]


@pytest.mark.parametrize(("case", "n_experts"), MATCH_CASES)
def test_param_matching_within_one_percent(case, n_experts):
    shape, topology = CASES[case]
    model, facts = build_model("cnn_matched", shape, 10, topology, n_experts=n_experts)
    info = facts
    target = reference_params("moe", shape, 10, topology, n_experts=n_experts)
    achieved = reference_params("cnn", shape, 10, topology, multiplier=info.width_multiplier)
    assert info.match == "params"
    assert info.match_target == target
    assert info.match_achieved == info.params == achieved == trainable(model)
    assert abs(achieved - target) / target <= 0.01
    assert info.flops_per_example == count_flops(model, shape)
    assert facts.match_target == target
    assert facts.n_experts == n_experts
    assert all(isinstance(m, nn.Linear) for m in (model.classifier.dense, model.classifier.head))
    # the recorded multiplier rebuilds the same widths
    rebuilt, _rebuilt_facts = build_model(
        "cnn", shape, 10, topology, width_multiplier=info.width_multiplier
    )
    assert rebuilt.topology == model.topology


@pytest.mark.parametrize("case", ["mnist1d", "digits"])
def test_param_matching_finds_the_closest_step(case):
    """No multiplier on a fine grid gets closer to the target than the one found."""
    shape, topology = CASES[case]
    _model, facts = build_model("cnn_matched", shape, 10, topology, n_experts=2)
    target = facts.match_target
    best_scan = min(
        abs(reference_params("cnn", shape, 10, topology, multiplier=i / 2000) - target)
        for i in range(1000, 8000)
    )
    assert abs(facts.match_achieved - target) <= best_scan


def test_matching_follows_moe_kwargs():
    without_bias = {"use_gating_bias": False}
    _model, facts = build_model(
        "cnn_matched", MNIST1D_SHAPE, 10, MNIST1D_TOPOLOGY, moe_kwargs=without_bias
    )
    target = reference_params("moe", MNIST1D_SHAPE, 10, MNIST1D_TOPOLOGY, gating_bias=False)
    assert facts.match_target == target


@pytest.mark.parametrize(("case", "n_experts"), [("cifar", 2), ("mnist1d", 4), ("volume3d", 2)])
def test_flop_matching_within_one_percent(case, n_experts):
    shape, topology = CASES[case]
    model, facts = build_model(
        "cnn_matched", shape, 10, topology, n_experts=n_experts, match="flops"
    )
    moe, _moe_facts = build_model("moe", shape, 10, topology, n_experts=n_experts)
    info = facts
    assert info.match == "flops"
    assert info.match_target == count_flops(moe, shape)
    assert info.match_achieved == info.flops_per_example == count_flops(model, shape)
    assert abs(info.match_achieved - info.match_target) / info.match_target <= 0.01
    assert info.params == trainable(model)


def test_unreachable_tolerance_names_the_closest_achievable_values():
    with pytest.raises(WidthMatchError) as caught:
        build_model("cnn_matched", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, match_tolerance=1e-5)
    err = caught.value
    target = reference_params("moe", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY)
    assert err.target == target
    (m_below, below), (m_above, above) = err.below, err.above
    assert below < target < above
    assert reference_params("cnn", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, multiplier=m_below) == below
    assert reference_params("cnn", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, multiplier=m_above) == above
    message = str(err)
    assert str(target) in message and str(below) in message and str(above) in message
    assert re.search(r"within 0\.0%", message)


def test_match_width_on_a_synthetic_measure():
    """The search against a brute-force scan, on a measure written here (sum of squared widths)."""
    spec = parse_topology({"blocks": [block([10, 20])], "dense_units": 40}, ndim=1)

    def measure(m):
        return sum(max(1, math.floor(w * m + 0.5)) ** 2 for w in (10, 20, 40))

    found = match_width(spec, measure, 12345, tolerance=0.05)
    best_scan = min(abs(measure(i / 1000) - 12345) for i in range(1, 20000))
    assert abs(found.achieved - 12345) <= best_scan
    assert measure(found.width_multiplier) == found.achieved
    # below the narrowest net (every width 1: measure 3) there is nothing on the lower side
    with pytest.raises(WidthMatchError) as caught:
        match_width(spec, measure, 2)
    assert caught.value.below is None
    assert caught.value.above[1] == 3


def test_matched_build_draws_no_extra_random_numbers():
    torch.manual_seed(0)
    matched, matched_facts = build_model("cnn_matched", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY)
    torch.manual_seed(0)
    plain, _plain_facts = build_model(
        "cnn", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY,
        width_multiplier=matched_facts.width_multiplier,
    )  # fmt: skip
    for (name, a), (_, b) in zip(
        matched.state_dict().items(), plain.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_model_facts_for_run_summaries():
    model, facts = build_model("moe", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY, n_experts=3, name="moe_k3")
    info = facts
    assert info.kind == "moe" and info.name == "moe_k3" and info.n_experts == 3
    assert info.width_multiplier == 1.0 and info.match_target is None
    assert info.params == trainable(model)
    assert isinstance(next(iter(model.moe_layers().values())), MoEBase)
    assert build_model("cnn", DIGITS_SHAPE, 10, DIGITS_TOPOLOGY).facts.n_experts is None
