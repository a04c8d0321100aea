"""Keras-style options of the MoE layers, each recomputed by hand from Keras 2's formulas:
activations, regularizers (default factor 0.01, activity penalty not divided by batch size),
constraints (default axes: each kernel's fan-in axes, axis 0 for biases) and bias initializers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from moe_lab.layers import ACTIVATION_NAMES, Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE

KERAS_EPS = 1e-7


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread avoids OpenMP hand-offs on 2 shared cores (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805
HAND_ACTIVATIONS: dict[str, Callable[[float], float]] = {
    "linear": lambda v: v,
    "relu": lambda v: max(v, 0.0),
    "tanh": math.tanh,
    "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
    "hard_sigmoid": lambda v: min(max(0.2 * v + 0.5, 0.0), 1.0),  # Keras 2, not torch's x/6 + 1/2
    "elu": lambda v: v if v > 0 else math.exp(v) - 1,
    "selu": lambda v: SELU_SCALE * (v if v > 0 else SELU_ALPHA * (math.exp(v) - 1)),
    "softplus": lambda v: math.log1p(math.exp(v)),
    "softsign": lambda v: v / (1 + abs(v)),
    "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
    "silu": lambda v: v / (1 + math.exp(-v)),
    "exponential": math.exp,
}


def test_every_named_activation_has_a_hand_formula() -> None:
    assert set(ACTIVATION_NAMES) == {*HAND_ACTIVATIONS, "softmax"}


def _probe_values() -> Tensor:
    return torch.tensor([-3.0, -1.2, -0.1, 0.0, 0.3, 1.7, 2.6, 4.0], dtype=torch.float64)


@pytest.mark.parametrize("name", list(HAND_ACTIVATIONS))
def test_expert_activation_by_name(name: str) -> None:
    """One expert, identity kernel, constant gate 1: the layer computes f(x) elementwise."""
    x = _probe_values()
    layer = DenseMoE(x.numel(), x.numel(), 1, expert_activation=name.upper()).double()
    with torch.no_grad():
        layer.expert_kernel.copy_(torch.eye(x.numel()).unsqueeze(-1))
        layer.gating_kernel.zero_()
        layer.gating_bias.fill_(1.0)
    expected = torch.tensor([HAND_ACTIVATIONS[name](v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(layer(x), expected)
    assert f"expert_activation={name}" in repr(layer)


@pytest.mark.parametrize("name", ["sigmoid", "hard_sigmoid", "exponential", "softsign"])
def test_gating_activation_by_name(name: str) -> None:
    """Experts that output 1: y = sum_k g(z_k), with z_k = x_k through the gating kernel."""
    x = _probe_values()[:4]
    layer = DenseMoE(4, 1, 4, gating_activation=name).double()
    with torch.no_grad():
        layer.expert_kernel.zero_()
        layer.expert_bias.fill_(1.0)
        layer.gating_kernel.copy_(torch.eye(4))
        layer.gating_bias.zero_()
    expected = sum(HAND_ACTIVATIONS[name](v) for v in x.tolist())
    torch.testing.assert_close(layer(x), torch.tensor([expected], dtype=torch.float64))


def test_callable_activations() -> None:
    x = _probe_values()
    layer = DenseMoE(x.numel(), x.numel(), 1, expert_activation=lambda t: t**2).double()
    with torch.no_grad():
        layer.expert_kernel.copy_(torch.eye(x.numel()).unsqueeze(-1))
        layer.gating_kernel.zero_()
        layer.gating_bias.fill_(2.0)
    torch.testing.assert_close(layer(x), 2 * x**2)


def test_gating_softmax_over_experts_per_filter() -> None:
    """Conv gates: one softmax over the K experts of each filter, per sample."""
    torch.manual_seed(0)
    layer = Conv1dMoE(2, 3, 4, 3, 5, gating_activation="softmax")
    layer(torch.randn(6, 2, 5))
    gates = layer.last_gates
    assert gates.shape == (6, 3, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(6, 3))
    assert (gates.std(0) > 0).all()  # depends on the sample


# ---------------------------------------------------------------------------------------------
# Regularizers
# ---------------------------------------------------------------------------------------------


def l1(w: Tensor) -> float:
    return sum(abs(v) for v in w.flatten().tolist())


def l2(w: Tensor) -> float:
    return sum(v * v for v in w.flatten().tolist())


REGULARIZER_CASES: dict[str, tuple[object, Callable[[Tensor], float]]] = {
    "l1": ("l1", lambda w: 0.01 * l1(w)),
    "l2": ("L2", lambda w: 0.01 * l2(w)),
    "l1_l2": ("l1_l2", lambda w: 0.01 * l1(w) + 0.01 * l2(w)),
    "dict": ({"l1": 0.003, "l2": 0.2}, lambda w: 0.003 * l1(w) + 0.2 * l2(w)),
    "dict_l2_only": ({"l2": 1e-4}, lambda w: 1e-4 * l2(w)),
    "callable": (lambda w: w.sum() ** 2, lambda w: sum(w.flatten().tolist()) ** 2),
}
PARAMS = ("expert_kernel", "gating_kernel", "expert_bias", "gating_bias")


def _make(kind: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    if kind == "dense":
        layer = DenseMoE(4, 3, 2, expert_bias_initializer="random_normal", **kwargs)
    else:
        layer = Conv2dMoE(2, 3, 2, 3, (4, 5), padding="same", gating_bias_initializer=0.5, **kwargs)
    return layer.double()


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("case", list(REGULARIZER_CASES))
@pytest.mark.parametrize("param", PARAMS)
def test_weight_regularizers(kind: str, case: str, param: str) -> None:
    spec, hand = REGULARIZER_CASES[case]
    layer = _make(kind, **{f"{param}_regularizer": spec})
    loss = layer.regularization_loss()
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(hand(getattr(layer, param).detach()), rel=1e-12)


def test_all_penalties_add_up_and_carry_gradients() -> None:
    layer = _make(
        "dense",
        expert_kernel_regularizer="l1",
        gating_kernel_regularizer="l2",
        expert_bias_regularizer={"l1": 0.5},
        gating_bias_regularizer="l1_l2",
    )
    with torch.no_grad():
        layer.gating_bias.copy_(torch.tensor([0.3, -0.4], dtype=torch.float64))
    ek, gk, eb, gb = (getattr(layer, n).detach() for n in PARAMS)
    expected = 0.01 * l1(ek) + 0.01 * l2(gk) + 0.5 * l1(eb) + 0.01 * (l1(gb) + l2(gb))
    loss = layer.regularization_loss()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(layer.expert_kernel.grad, 0.01 * ek.sign())
    torch.testing.assert_close(layer.gating_kernel.grad, 0.02 * gk)


def test_regularizer_on_a_disabled_bias_is_ignored() -> None:
    layer = _make("dense", expert_bias_regularizer="l1", use_expert_bias=False)
    assert layer.regularization_loss().item() == 0.0


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_activity_regularizer_uses_the_last_forward_unscaled_by_batch(kind: str) -> None:
    layer = _make(kind, activity_regularizer="l1_l2")
    assert layer.regularization_loss().item() == 0.0  # no forward yet
    shape = (1, 4) if kind == "dense" else (1, 2, 4, 5)
    x1 = torch.randn(shape, dtype=torch.float64)
    y1 = layer(x1).detach()
    one = 0.01 * l1(y1) + 0.01 * l2(y1)
    assert layer.regularization_loss().item() == pytest.approx(one, rel=1e-12)
    # the same sample four times: Keras 2.0 sums over the batch, it does not average
    layer(x1.expand(4, *shape[1:]))
    assert layer.regularization_loss().item() == pytest.approx(4 * one, rel=1e-12)
    # the penalty follows the last forward only
    y2 = layer(torch.randn(shape, dtype=torch.float64)).detach()
    assert layer.regularization_loss().item() == pytest.approx(
        0.01 * l1(y2) + 0.01 * l2(y2), rel=1e-12
    )


def test_activity_and_weight_penalties_add() -> None:
    layer = _make("dense", activity_regularizer={"l2": 0.1}, gating_kernel_regularizer="l1")
    y = layer(torch.randn(3, 4, dtype=torch.float64)).detach()
    expected = 0.1 * l2(y) + 0.01 * l1(layer.gating_kernel.detach())
    assert layer.regularization_loss().item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Constraints
# ---------------------------------------------------------------------------------------------


def keras_max_norm(max_value: float) -> Callable[[float], float]:
    return lambda n: min(max(n, 0.0), max_value) / (KERAS_EPS + n)


def keras_unit_norm() -> Callable[[float], float]:
    return lambda n: 1 / (KERAS_EPS + n)


def keras_min_max_norm(lo: float, hi: float, rate: float) -> Callable[[float], float]:
    return lambda n: (rate * min(max(n, lo), hi) + (1 - rate) * n) / (KERAS_EPS + n)


def project_by_hand(w: Tensor, axes: tuple[int, ...], factor: Callable[[float], float]) -> Tensor:
    """Scale every slice over ``axes`` (one slice per index of the other axes) by factor(norm)."""
    axes = tuple(a % w.dim() for a in axes)
    keep = [a for a in range(w.dim()) if a not in axes]
    out = w.clone()
    for index in itertools.product(*(range(w.shape[a]) for a in keep)):
        sel = [slice(None)] * w.dim()
        for a, i in zip(keep, index, strict=True):
            sel[a] = i
        block = w[tuple(sel)]
        norm = math.sqrt(sum(v * v for v in block.flatten().tolist()))
        out[tuple(sel)] = block * factor(norm)
    return out


# fan-in axes per layer kind and parameter (documented in the layers' _constraint_axes)
DEFAULT_AXES = {
    ("dense", "expert_kernel"): (0,),  # (in, out, K): in
    ("dense", "gating_kernel"): (0,),  # (in, K): in
    ("dense", "expert_bias"): (0,),
    ("dense", "gating_bias"): (0,),
    ("conv", "expert_kernel"): (1, 2, 3),  # (out*K, C, kh, kw): C, kh, kw
    ("conv", "gating_kernel"): (0, 1, 2),  # (C, H, W, out, K): the whole input volume
    # (out, K): each element on its own, as the original's (1, ..., 1, F, K) bias with axis 0
    ("conv", "expert_bias"): (),
    ("conv", "gating_bias"): (0,),
}

NORM_CONSTRAINTS: dict[str, tuple[object, Callable[[float], float]]] = {
    "max_norm": ("max_norm", keras_max_norm(2.0)),
    "max_norm_dict": ({"name": "max_norm", "max_value": 0.7}, keras_max_norm(0.7)),
    "unit_norm": ("unit_norm", keras_unit_norm()),
    "min_max_norm": ("min_max_norm", keras_min_max_norm(0.0, 1.0, 1.0)),
    "min_max_norm_rate": (
        {"name": "min_max_norm", "min_value": 0.9, "max_value": 1.3, "rate": 0.6},
        keras_min_max_norm(0.9, 1.3, 0.6),
    ),
}


@torch.no_grad()
def _spread_norms(layer: nn.Module, kind: str) -> None:
    """Weights whose default-axes slice norms scatter around 1.4, on both sides of the bounds."""
    gen = torch.Generator().manual_seed(1)
    for name, p in layer.named_parameters():
        fan = math.prod(p.shape[a] for a in DEFAULT_AXES[(kind, name)])
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.copy_(noise * torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2.4 / math.sqrt(fan))


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("case", list(NORM_CONSTRAINTS))
@pytest.mark.parametrize("param", PARAMS)
def test_norm_constraints_default_axes(kind: str, case: str, param: str) -> None:
    spec, factor = NORM_CONSTRAINTS[case]
    layer = _make(kind, **{f"{param}_constraint": spec})
    _spread_norms(layer, kind)
    before = {n: getattr(layer, n).detach().clone() for n in PARAMS}
    handle = getattr(layer, param)
    layer.apply_constraints()
    assert getattr(layer, param) is handle  # in place: optimizers keep their reference
    expected = project_by_hand(before[param], DEFAULT_AXES[(kind, param)], factor)
    torch.testing.assert_close(getattr(layer, param).detach(), expected, rtol=1e-12, atol=1e-12)
    for other in set(PARAMS) - {param}:
        assert torch.equal(getattr(layer, other), before[other])


@pytest.mark.parametrize("cls", [Conv1dMoE, Conv2dMoE, Conv3dMoE])
def test_conv_expert_bias_max_norm_acts_per_element_as_the_original(cls) -> None:
    """The original's conv expert_bias is (1, ..., 1, F, K): Keras' default axis 0 is a
    singleton axis there, so max_norm clips each element on its own (not over the F filters)."""
    layer = cls(2, 3, 2, 1, (4,) * cls.ndim, expert_bias_constraint="max_norm").double()
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([[3.0, 0.5], [1.0, -4.0], [0.2, 1.0]]))
    layer.apply_constraints()
    expected = torch.tensor([[2.0, 0.5], [1.0, -2.0], [0.2, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(layer.expert_bias.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_max_norm_clips_the_long_slices_and_keeps_the_short(kind: str) -> None:
    axes = DEFAULT_AXES[(kind, "expert_kernel")]
    probe = _make(kind)
    _spread_norms(probe, kind)
    norms = probe.expert_kernel.detach().square().sum(axes).sqrt()
    bound = norms.median().item()
    assert (norms > bound).any() and (norms < bound).any()

    layer = _make(kind, expert_kernel_constraint={"name": "max_norm", "max_value": bound})
    _spread_norms(layer, kind)
    layer.apply_constraints()
    new_norms = layer.expert_kernel.detach().square().sum(axes).sqrt()
    assert (new_norms <= bound + 1e-6).all()
    torch.testing.assert_close(
        new_norms[norms > bound], torch.full_like(norms[norms > bound], bound)
    )
    torch.testing.assert_close(new_norms[norms < bound], norms[norms < bound])


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("param", PARAMS)
def test_non_neg(kind: str, param: str) -> None:
    layer = _make(kind, **{f"{param}_constraint": "non_neg"})
    _spread_norms(layer, kind)
    before = getattr(layer, param).detach().clone()
    layer.apply_constraints()
    expected = torch.tensor(
        [v if v >= 0 else 0.0 for v in before.flatten().tolist()], dtype=before.dtype
    )
    torch.testing.assert_close(getattr(layer, param).detach(), expected.view_as(before))


@pytest.mark.parametrize(
    ("kind", "param", "axis"),
    [
        ("dense", "expert_kernel", [0, 2]),
        ("dense", "expert_kernel", -1),
        ("conv", "expert_kernel", (2, 3)),
        ("conv", "gating_kernel", [-1, -2]),
        ("conv", "expert_bias", 1),
    ],
)
def test_explicit_constraint_axis_indexes_our_layout(kind: str, param: str, axis: object) -> None:
    layer = _make(
        kind, **{f"{param}_constraint": {"name": "max_norm", "max_value": 0.5, "axis": axis}}
    )
    _spread_norms(layer, kind)
    before = getattr(layer, param).detach().clone()
    layer.apply_constraints()
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    expected = project_by_hand(before, axes, keras_max_norm(0.5))
    torch.testing.assert_close(getattr(layer, param).detach(), expected, rtol=1e-12, atol=1e-12)


def test_callable_constraint() -> None:
    layer = _make("conv", gating_kernel_constraint=lambda w: w.clamp(-0.1, 0.1))
    _spread_norms(layer, "conv")
    before = layer.gating_kernel.detach().clone()
    layer.apply_constraints()
    expected = torch.tensor(
        [min(max(v, -0.1), 0.1) for v in before.flatten().tolist()], dtype=before.dtype
    )
    torch.testing.assert_close(layer.gating_kernel.detach(), expected.view_as(before))


def test_constraint_on_a_disabled_bias_is_ignored() -> None:
    layer = _make("conv", gating_bias_constraint="unit_norm", use_gating_bias=False)
    layer.apply_constraints()
    assert layer.gating_bias is None


def test_constraint_after_an_optimizer_step() -> None:
    """The training loop's use: step, then project."""
    layer = _make("dense", expert_kernel_constraint="unit_norm")
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(torch.randn(8, 4, dtype=torch.float64)).square().sum().backward()
    opt.step()
    layer.apply_constraints()
    norms = layer.expert_kernel.detach().square().sum(0).sqrt()
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Bias initializers
# ---------------------------------------------------------------------------------------------


def _bias(spec: object, units: int = 4000) -> Tensor:
    torch.manual_seed(0)
    return DenseMoE(2, units, 5, expert_bias_initializer=spec).expert_bias.detach().double()


def test_constant_bias_initializers() -> None:
    assert (_bias("zeros", 3) == 0).all()
    assert (_bias("ones", 3) == 1).all()
    assert (_bias(0.25, 3) == 0.25).all()
    assert (_bias(-2, 3) == -2).all()
    assert (
        _bias({"name": "constant", "value": 0.1}, 3)
        == torch.tensor(0.1, dtype=torch.float32).double()
    ).all()
    assert (_bias({"name": "Constant"}, 3) == 0).all()


@pytest.mark.parametrize(
    ("spec", "lo", "hi"),
    [
        ("random_uniform", -0.05, 0.05),
        ({"name": "random_uniform", "minval": 1, "maxval": 3}, 1.0, 3.0),
    ],
)
def test_uniform_bias_initializer(spec: object, lo: float, hi: float) -> None:
    b = _bias(spec)
    width = hi - lo
    assert lo <= b.min() < lo + 0.01 * width and hi - 0.01 * width < b.max() <= hi
    assert abs(b.std().item() / (width / math.sqrt(12)) - 1) < 0.03


@pytest.mark.parametrize(
    ("spec", "mean", "std"),
    [
        ("random_normal", 0.0, 0.05),
        ({"name": "random_normal", "mean": 1.0, "stddev": 0.2}, 1.0, 0.2),
    ],
)
def test_normal_bias_initializer(spec: object, mean: float, std: float) -> None:
    b = _bias(spec)
    assert abs(b.mean().item() - mean) < 4 * std / math.sqrt(b.numel())
    assert abs(b.std().item() / std - 1) < 0.03


def test_callable_bias_initializer_and_gating_bias() -> None:
    torch.manual_seed(0)
    layer = Conv2dMoE(
        1,
        3,
        2,
        1,
        (2, 2),
        expert_bias_initializer=lambda t: t.copy_(torch.arange(6.0).view(3, 2)),
        gating_bias_initializer={"name": "constant", "value": -1.5},
    )
    assert torch.equal(layer.expert_bias.detach(), torch.arange(6.0).view(3, 2))
    assert (layer.gating_bias == -1.5).all()
    layer.reset_parameters()  # initializers run again
    assert torch.equal(layer.expert_bias.detach(), torch.arange(6.0).view(3, 2))
