"""torch conventions of the layers (factory keywords, explicit signatures, data_format) and porting
from the original Keras layers (its keyword names, its weight arrays)."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch

from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE, MoEBase, load_keras_weights

CONV = {1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}
ROUTING_KEYWORDS = ("top_k", "noisy_gating", "gate_input", "expert_backend", "device", "dtype")


@pytest.mark.parametrize("cls", [DenseMoE, Conv1dMoE, Conv2dMoE, Conv3dMoE])
def test_signatures_are_explicit_and_keyword_only(cls) -> None:
    params = inspect.signature(cls).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    base = {n for n, p in inspect.signature(MoEBase).parameters.items() if p.kind is p.KEYWORD_ONLY}
    mine = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert base <= mine  # every option of the base appears in help() of the subclass
    for name in ROUTING_KEYWORDS:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["top_k"].default is None and params["expert_backend"].default == "auto"


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not_a_keyword"):
        DenseMoE(4, 3, 2, not_a_keyword=1)


@pytest.mark.parametrize(
    ("build", "name", "replacement"),
    [
        (lambda: DenseMoE(4, 3, 2, units=3), "units", "out_features"),
        (lambda: Conv2dMoE(3, 4, 2, 3, (8, 8), n_filters=4), "n_filters", "out_channels"),
        (
            lambda: Conv2dMoE(3, 4, 2, 3, (8, 8), n_experts_per_filter=2),
            "n_experts_per_filter",
            "n_experts",
        ),
        (lambda: Conv1dMoE(3, 4, 2, 3, 8, strides=2), "strides", "stride"),
        (lambda: Conv3dMoE(3, 4, 2, 3, (6, 6, 6), dilation_rate=1), "dilation_rate", "dilation"),
    ],
)
def test_original_keywords_name_the_torch_keyword(build, name, replacement) -> None:
    with pytest.raises(TypeError, match=f"'{name}' -> {replacement}"):
        build()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("noisy", [False, True])
def test_factory_keywords(dtype, noisy) -> None:
    layers = [
        DenseMoE(4, 3, 2, dtype=dtype, device="cpu", noisy_gating=noisy),
        DenseMoE(4, 3, 4, top_k=2, dtype=dtype, device=torch.device("cpu"), noisy_gating=noisy),
        Conv2dMoE(3, 4, 2, 3, (6, 6), dtype=dtype, device="cpu", noisy_gating=noisy),
    ]
    for layer in layers:
        for name, p in layer.named_parameters():
            assert p.dtype == dtype and p.device.type == "cpu", name
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    assert layers[2](x).dtype == dtype


def test_factory_keywords_on_meta_device() -> None:
    layer = Conv1dMoE(3, 4, 2, 3, 8, device="meta")
    assert all(p.is_meta for p in layer.parameters())


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize(
    "options",
    [
        {"expert_activation": "relu", "gating_activation": "softmax"},
        {"gate_input": "pooled", "expert_backend": "kernel_mix"},
        {"top_k": 1, "expert_activation": "relu"},
        {"top_k": 2, "expert_backend": "kernel_mix", "gate_input": "pooled"},
    ],
)
def test_channels_last_data_format_equals_permuting_around_channels_first(ndim, options) -> None:
    size = {1: (9,), 2: (7, 6), 3: (4, 5, 3)}[ndim]
    cls = CONV[ndim]
    torch.manual_seed(ndim)
    first = cls(3, 4, 3, 3, size, padding="same", **options).double()
    last = cls(3, 4, 3, 3, size, padding="same", data_format="channels_last", **options).double()
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    x_cl = x.movedim(1, -1).contiguous().requires_grad_(True)
    x = x.requires_grad_(True)
    y, y_cl = first(x), last(x_cl)
    assert y_cl.shape == (2, *y.shape[2:], 4)
    torch.testing.assert_close(y_cl, y.movedim(1, -1))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_cl * g.movedim(1, -1)).sum().backward()
    torch.testing.assert_close(x_cl.grad, x.grad.movedim(1, -1))
    torch.testing.assert_close(last.expert_kernel.grad, first.expert_kernel.grad)


def test_channels_last_data_format_errors() -> None:
    layer = Conv2dMoE(3, 4, 2, 3, (6, 6), data_format="channels_last")
    with pytest.raises(ValueError, match="last dim"):
        layer(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"\(B, 6, 6, 3\)"):
        layer(torch.randn(6, 6, 3))
    with pytest.raises(ValueError, match=r"channels_first.*channels_last"):
        Conv2dMoE(3, 4, 2, 3, (6, 6), data_format="NHWC")


# ---------------------------------------------------------------------------------------------
# The original's weights, in Keras layout, through an independent NumPy loop over its formula
# ---------------------------------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def keras_conv_moe(x, w, expert_bias, gating, gating_bias, stride, dilation, padding):
    """The original's forward, channels last, by loops: ``x (B, *S, C)``, ``w (*ks, C, F*K)``,
    ``expert_bias (1, .., 1, F, K)``, ``gating (*S, C, F, K)``, relu experts, softmax gates."""
    b, *size, _ = x.shape
    ks, (f, k) = w.shape[:-2], gating.shape[-2:]
    d = len(size)
    pads, outs = [], []
    for n, kk in zip(size, ks, strict=True):
        if padding == "same":
            out = -(-n // stride)
            total = max((out - 1) * stride + (kk - 1) * dilation + 1 - n, 0)
            pads.append(total // 2)
        else:
            out = (n - (kk - 1) * dilation - 1) // stride + 1
            pads.append(0)
        outs.append(out)
    hidden = np.zeros((b, *outs, f * k))
    for bi in range(b):
        for pos in itertools.product(*map(range, outs)):
            acc = np.zeros(f * k)
            for off in itertools.product(*map(range, ks)):
                src = [
                    p * stride + o * dilation - pad
                    for p, o, pad in zip(pos, off, pads, strict=True)
                ]
                if all(0 <= s < n for s, n in zip(src, size, strict=True)):
                    acc += x[(bi, *src)] @ w[off]
            hidden[(bi, *pos)] = acc
    hidden = np.maximum(hidden.reshape(b, *outs, f, k) + expert_bias.reshape(f, k), 0)
    logits = x.reshape(b, -1) @ gating.reshape(-1, f * k)
    gates = _softmax(logits.reshape(b, f, k) + gating_bias)
    return (hidden * gates.reshape(b, *(1,) * d, f, k)).sum(-1)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("as_list", [False, True])
def test_load_keras_weights_conv_matches_the_original_formula(ndim, as_list) -> None:
    rng = np.random.default_rng(ndim)
    c, f, k = 2, 3, 2
    size = {1: (7,), 2: (5, 6), 3: (4, 3, 5)}[ndim]
    ks = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}[ndim]
    stride, dilation, padding = (2, 1, "same") if ndim != 2 else (1, 2, "valid")
    keras = {
        "expert_kernel": rng.normal(size=(*ks, c, f * k)),
        "gating_kernel": rng.normal(size=(*size, c, f, k)) * 0.3,
        "expert_bias": rng.normal(size=(*(1,) * ndim, f, k)),
        "gating_bias": rng.normal(size=(f, k)),
    }
    x = rng.normal(size=(2, *size, c))
    expected = keras_conv_moe(
        x, keras["expert_kernel"], keras["expert_bias"], keras["gating_kernel"],
        keras["gating_bias"], stride, dilation, padding,
    )  # fmt: skip
    layer = CONV[ndim](
        c, f, k, ks, size, stride=stride, dilation=dilation, padding=padding,
        data_format="channels_last", expert_activation="relu", gating_activation="softmax",
    ).double()  # fmt: skip
    load_keras_weights(layer, list(keras.values()) if as_list else keras)
    y = layer(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    # and a channels_first moe_lab layer reads the same weights for channels-first inputs
    first = CONV[ndim](
        c, f, k, ks, size, stride=stride, dilation=dilation, padding=padding,
        expert_activation="relu", gating_activation="softmax", dtype=torch.float64,
    )  # fmt: skip
    load_keras_weights(first, keras)
    y_first = first(torch.from_numpy(x).movedim(-1, 1))
    np.testing.assert_allclose(y_first.movedim(1, -1).detach().numpy(), expected, atol=1e-10)


def test_load_keras_weights_channels_first_original() -> None:
    """An original layer built with data_format='channels_first' has its gating kernel in
    (C, *S, F, K) order, the input's."""
    rng = np.random.default_rng(5)
    c, f, k, size = 2, 3, 2, (5, 4)
    keras = {
        "expert_kernel": rng.normal(size=(3, 3, c, f * k)),
        "gating_kernel": rng.normal(size=(c, *size, f, k)) * 0.3,
        "expert_bias": rng.normal(size=(1, 1, f, k)),
        "gating_bias": rng.normal(size=(f, k)),
    }
    x_cf = rng.normal(size=(2, c, *size))
    gating_cl = np.moveaxis(keras["gating_kernel"], 0, 2)  # the same map, channels-last order
    expected = keras_conv_moe(
        np.moveaxis(x_cf, 1, -1), keras["expert_kernel"], keras["expert_bias"], gating_cl,
        keras["gating_bias"], 1, 1, "same",
    )  # fmt: skip
    layer = Conv2dMoE(
        c, f, k, 3, size, padding="same", expert_activation="relu", gating_activation="softmax"
    ).double()
    load_keras_weights(layer, keras, data_format="channels_first")
    y = layer(torch.from_numpy(x_cf)).movedim(1, -1)
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("top_k", [None, 2])
def test_load_keras_weights_dense_matches_the_original_formula(top_k) -> None:
    rng = np.random.default_rng(0)
    n_in, units, k = 5, 4, 3
    keras = {
        "expert_kernel": rng.normal(size=(n_in, units, k)),
        "gating_kernel": rng.normal(size=(n_in, k)),
        "expert_bias": rng.normal(size=(units, k)),
        "gating_bias": rng.normal(size=(k,)),
    }
    x = rng.normal(size=(6, n_in))
    expected = np.zeros((6, units))
    for i in range(6):  # the original's formula, one sample and expert at a time
        gates = _softmax(x[i] @ keras["gating_kernel"] + keras["gating_bias"])
        for e in range(k):
            h = np.maximum(x[i] @ keras["expert_kernel"][:, :, e] + keras["expert_bias"][:, e], 0)
            expected[i] += gates[e] * h
    layer = DenseMoE(n_in, units, k, expert_activation="relu", gating_activation="softmax")
    load_keras_weights(layer.double(), keras)
    np.testing.assert_allclose(layer(torch.from_numpy(x)).detach().numpy(), expected, atol=1e-10)
    if top_k is not None:  # a ported layer can then be routed; its values stay the original's
        sparse = DenseMoE(n_in, units, k, expert_activation="relu", top_k=k, dtype=torch.float64)
        load_keras_weights(sparse, keras)
        np.testing.assert_allclose(sparse(torch.from_numpy(x)).detach().numpy(), expected)


def test_load_keras_weights_errors() -> None:
    layer = Conv2dMoE(2, 3, 2, 3, (5, 4))
    before = layer.expert_kernel.detach().clone()
    good = {
        "expert_kernel": np.zeros((3, 3, 2, 6)),
        "gating_kernel": np.zeros((5, 4, 2, 3, 2)),
        "expert_bias": np.zeros((1, 1, 3, 2)),
        "gating_bias": np.zeros((3, 2)),
    }
    with pytest.raises(ValueError, match=r"original's layout for this layer is \(5, 4, 2, 3, 2\)"):
        load_keras_weights(layer, {**good, "gating_kernel": np.zeros((2, 5, 4, 3, 2))})
    with pytest.raises(ValueError, match=r"missing \['gating_bias'\]"):
        load_keras_weights(layer, {k: v for k, v in good.items() if k != "gating_bias"})
    with pytest.raises(ValueError, match="expected 4 arrays"):
        load_keras_weights(layer, list(good.values())[:3])
    no_bias = Conv2dMoE(2, 3, 2, 3, (5, 4), use_expert_bias=False)
    with pytest.raises(ValueError, match=r"unexpected \['expert_bias'\]"):
        load_keras_weights(no_bias, good)
    with pytest.raises(ValueError, match="gate_input='full'"):
        load_keras_weights(Conv2dMoE(2, 3, 2, 3, gate_input="pooled"), good)
    assert torch.equal(layer.expert_kernel, before)  # nothing half-loaded


def test_the_options_type_lists_exactly_moebase_keywords() -> None:
    """``MoEOptions`` (what editors show for ``**options``) and ``MoEBase.__init__``'s keyword-only
    parameters name the same options with the same annotations, in the same order."""
    import inspect

    from moe_lab.layers.base import MoEBase, MoEOptions

    declared = [
        (p.name, p.annotation)
        for p in inspect.signature(MoEBase.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    typed = [
        (name, getattr(t, "__forward_arg__", t)) for name, t in MoEOptions.__annotations__.items()
    ]
    assert typed == declared
    for layer in (DenseMoE, Conv1dMoE, Conv2dMoE, Conv3dMoE):
        shown = inspect.signature(layer).parameters
        assert [name for name, _ in declared if name in shown] == [n for n, _ in declared]


@pytest.mark.parametrize("make", ["dense", "conv"])
def test_expert_similarity_against_loops(make: str) -> None:
    """The mean cosine between a unit's different expert kernels, by explicit loops; 1 when the
    experts are copies of one kernel."""
    import math

    from moe_lab.layers.diagnostics import expert_similarity

    torch.manual_seed(0)
    layer = DenseMoE(5, 3, 4) if make == "dense" else Conv2dMoE(2, 3, 4, 3, (6, 6))
    w = layer.expert_kernel.detach()
    total, count = 0.0, 0
    for f in range(3):
        for k in range(4):
            for m in range(4):
                if k == m:
                    continue
                if make == "dense":
                    a, b = w[:, f, k], w[:, f, m]
                else:
                    a, b = w[f * 4 + k].flatten(), w[f * 4 + m].flatten()
                total += float(a @ b) / (float(a.norm()) * float(b.norm()))
                count += 1
    assert expert_similarity(layer) == pytest.approx(total / count, abs=1e-6)
    with torch.no_grad():  # every expert a copy of the first
        if make == "dense":
            layer.expert_kernel.copy_(w[:, :, :1].expand_as(w))
        else:
            layer.expert_kernel.copy_(
                w.view(3, 4, -1)[:, :1].expand(3, 4, w[0].numel()).reshape_as(w)
            )
    assert expert_similarity(layer) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(expert_similarity(DenseMoE(5, 3, 1)))
