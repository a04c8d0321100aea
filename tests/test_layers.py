"""The MoE layers against independent references written here, from the original's formulas:

- DenseMoE: a loop over experts, ``y = sum_k g(v_k.x + b_k) f(W_k x + c_k)``;
- Conv{1,2,3}dMoE: for each filter f and expert k, the convolution of ONE expert kernel computed by
  an explicit loop over kernel offsets on an input zero-padded by the Keras formulas (never F.conv),
  gate logits as an explicit sum over the whole input volume, softmax over experts by hand.

Also: Keras output lengths, the original's channels-last weight layouts, gradcheck, init statistics,
and "a normal torch module" (dtypes, channels_last, compile, state_dict, seeding, pickling).
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import pickle
import random
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import Tensor, nn

from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE

CONV_LAYERS = {1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny: with 2 threads on 2 shared cores, OpenMP's hand-offs made them
    10-50x slower under load. Restored afterwards for the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ACTIVATION_PAIRS = [(None, None), ("relu", "softmax")]  # the original's defaults, and its demos'
# id -> (use_expert_bias, use_gating_bias)
BIASES = {
    "biases": (True, True),
    "nobias": (False, False),
    "expertbias": (True, False),
    "gatingbias": (False, True),
}


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def softmax_by_hand(z: Tensor, dim: int) -> Tensor:
    e = (z - z.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def act_by_hand(name: str | None, t: Tensor, expert_dim: int) -> Tensor:
    if name is None:
        return t
    if name == "relu":
        return torch.where(t > 0, t, torch.zeros_like(t))
    if name == "tanh":
        return (t.exp() - (-t).exp()) / (t.exp() + (-t).exp())
    if name == "softmax":
        return softmax_by_hand(t, expert_dim)
    raise AssertionError(name)


def keras_pads(n: int, k: int, s: int, d: int, padding: str | int) -> tuple[int, int]:
    """(before, after) zero padding of one spatial dim, Keras' 'same' and 'causal' rules."""
    span = (k - 1) * d + 1
    if padding == "valid":
        return 0, 0
    if padding == "causal":
        return span - 1, 0
    if padding == "same":
        out = -(-n // s)  # ceil(n / s)
        total = max((out - 1) * s + span - n, 0)
        return total // 2, total - total // 2
    assert isinstance(padding, int)
    return padding, padding


def keras_out_len(n: int, k: int, s: int, d: int, padding: str | int) -> int:
    """Output length straight from Keras' formulas (ints: nn.Conv's formula)."""
    if padding == "valid":
        return (n - (k - 1) * d - 1) // s + 1
    if padding == "same":
        return math.ceil(n / s)
    if padding == "causal":  # left-pad (k-1)d, then valid
        return (n + (k - 1) * d - (k - 1) * d - 1) // s + 1
    return (n + 2 * padding - (k - 1) * d - 1) // s + 1


def conv_one_kernel(
    x: Tensor,
    w: Tensor,
    stride: Sequence[int],
    dilation: Sequence[int],
    pads: Sequence[tuple[int, int]],
) -> Tensor:
    """Cross-correlation of ``x (B, C, *S)`` with ONE kernel ``w (C, *ks)`` -> ``(B, *S_out)``:
    ``out[b, p] = sum_{c, o} x_pad[b, c, p*s + o*d] w[c, o]``, an explicit loop over offsets o."""
    batch, channels, *size = x.shape
    padded = x.new_zeros(
        batch, channels, *(n + a + b for n, (a, b) in zip(size, pads, strict=True))
    )
    padded[
        (slice(None), slice(None), *(slice(a, a + n) for n, (a, _) in zip(size, pads, strict=True)))
    ] = x
    ks = w.shape[1:]
    out_size = [
        (n - (k - 1) * d - 1) // s + 1
        for n, k, s, d in zip(padded.shape[2:], ks, stride, dilation, strict=True)
    ]
    out = x.new_zeros(batch, *out_size)
    for offset in itertools.product(*(range(k) for k in ks)):
        window = tuple(
            slice(o * d, o * d + (m - 1) * s + 1, s)
            for o, d, m, s in zip(offset, dilation, out_size, stride, strict=True)
        )
        patch = padded[(slice(None), slice(None), *window)]  # (B, C, *S_out)
        for c in range(channels):
            out = out + patch[:, c] * w[(c, *offset)]
    return out


def per_dim_pads(cfg: dict) -> list[tuple[int, int]]:
    padding = cfg["padding"]
    return [
        keras_pads(n, k, s, d, padding if isinstance(padding, str) else padding[i])
        for i, (n, k, s, d) in enumerate(
            zip(cfg["input_size"], cfg["kernel_size"], cfg["stride"], cfg["dilation"], strict=True)
        )
    ]


def conv_moe_reference(
    x: Tensor,
    params: dict[str, Tensor | None],
    cfg: dict,
    expert_activation: str | None,
    gating_activation: str | None,
) -> Tensor:
    """The original's formula, filter by filter, expert by expert."""
    ek, gk, eb, gb = (
        params[n] for n in ("expert_kernel", "gating_kernel", "expert_bias", "gating_bias")
    )
    batch, n_out, k_exp = x.shape[0], gk.shape[-2], gk.shape[-1]
    pads = per_dim_pads(cfg)

    # gate logits z[b, f, k] = sum over the whole volume of x[b, c, s] V[c, s, f, k], + d[f, k]
    logits = x.new_zeros(batch, n_out, k_exp)
    for f in range(n_out):
        for k in range(k_exp):
            logits[:, f, k] = (x * gk[..., f, k]).flatten(1).sum(1)
            if gb is not None:
                logits[:, f, k] += gb[f, k]
    gates = act_by_hand(gating_activation, logits, expert_dim=2)

    outputs = []
    for f in range(n_out):
        experts = []
        for k in range(k_exp):
            h = conv_one_kernel(x, ek[f * k_exp + k], cfg["stride"], cfg["dilation"], pads)
            if eb is not None:
                h = h + eb[f, k]
            experts.append(h)
        hidden = act_by_hand(
            expert_activation, torch.stack(experts, 1), expert_dim=1
        )  # (B, K, *S')
        spatial_ones = [1] * (x.dim() - 2)
        outputs.append(
            sum(gates[:, f, k].view(-1, *spatial_ones) * hidden[:, k] for k in range(k_exp))
        )
    return torch.stack(outputs, 1)


def dense_moe_reference(
    x: Tensor,
    params: dict[str, Tensor | None],
    expert_activation: str | None,
    gating_activation: str | None,
) -> Tensor:
    """The original's formula, expert by expert."""
    ek, gk, eb, gb = (
        params[n] for n in ("expert_kernel", "gating_kernel", "expert_bias", "gating_bias")
    )
    n_experts = ek.shape[-1]
    hidden, logits = [], []
    for k in range(n_experts):
        h = x @ ek[:, :, k]
        z = x @ gk[:, k]
        if eb is not None:
            h = h + eb[:, k]
        if gb is not None:
            z = z + gb[k]
        hidden.append(h)
        logits.append(z)
    hidden_t = act_by_hand(expert_activation, torch.stack(hidden, -1), expert_dim=-1)
    gates = act_by_hand(gating_activation, torch.stack(logits, -1), expert_dim=-1)
    return sum(gates[..., k, None] * hidden_t[..., k] for k in range(n_experts))


def params_of(layer: nn.Module) -> dict[str, Tensor | None]:
    return {
        n: getattr(layer, n)
        for n in ("expert_kernel", "gating_kernel", "expert_bias", "gating_bias")
    }


@torch.no_grad()
def spread_parameters(layer: nn.Module, seed: int) -> None:
    """Non-zero biases and gating weights large enough that the gates differ per sample: with the
    default init (zero biases, near-uniform gates) bias and gate bugs would hide."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in layer.named_parameters():
        fan = p[..., 0].numel() if name == "gating_kernel" else 1
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(fan) * 1.5)


# ---------------------------------------------------------------------------------------------
# Random configurations covering the padding / stride / dilation combinations
# ---------------------------------------------------------------------------------------------

# name -> (padding, kernel, stride, dilation); per-dim values cycle over the spatial dims.
CONV_CASES: dict[
    str, tuple[str | int | tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]
] = {
    "valid": ("valid", (3, 2, 1), (1, 1, 1), (1, 1, 1)),
    "valid_strided_dilated": ("valid", (2, 3, 2), (2, 1, 3), (2, 1, 2)),
    "same_even_total": ("same", (3, 3, 5), (1, 1, 1), (1, 1, 1)),  # total (k-1)d: even
    "same_odd_total": ("same", (2, 4, 2), (1, 1, 1), (1, 3, 1)),  # total (k-1)d: odd
    "same_strided_dilated": ("same", (3, 2, 3), (2, 3, 2), (2, 1, 1)),
    "int_padding": ((1, 0, 2), (3, 2, 3), (2, 1, 1), (1, 2, 1)),
    "causal": ("causal", (3, 3, 3), (2, 2, 2), (2, 2, 2)),  # 1D only
}


def conv_config(ndim: int, case: str, seed: int) -> dict:
    padding, kernel, stride, dilation = (
        v if isinstance(v, str) else v[:ndim] for v in CONV_CASES[case]
    )
    rng = random.Random(seed)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    if padding == "same":
        size = [rng.randint(1, 7) for _ in range(ndim)]
    else:  # valid / causal / ints: at least one full window
        size = [rng.randint(s, s + 4) for s in spans]
    return {
        "batch": rng.randint(1, 3),
        "in_channels": rng.randint(1, 3),
        "out_channels": rng.randint(1, 3),
        "n_experts": rng.randint(1, 3),
        "kernel_size": tuple(kernel),
        "input_size": tuple(size),
        "stride": tuple(stride),
        "dilation": tuple(dilation),
        "padding": padding if isinstance(padding, str) else tuple(padding),
    }


def build_conv(cfg: dict, **kwargs) -> nn.Module:
    return CONV_LAYERS[len(cfg["input_size"])](
        cfg["in_channels"],
        cfg["out_channels"],
        cfg["n_experts"],
        cfg["kernel_size"],
        cfg["input_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        **kwargs,
    )


def conv_cases() -> list:
    out = []
    for ndim in (1, 2, 3):
        for case in CONV_CASES:
            if case == "causal" and ndim != 1:
                continue
            out.append(pytest.param(ndim, case, id=f"{ndim}d-{case}"))
    return out


def test_padding_cases_cover_odd_and_even_same_totals() -> None:
    """The 'same' cases above really produce odd and even totals (so the asymmetric split is hit)."""
    parities = set()
    for ndim in (1, 2, 3):
        for case in ("same_even_total", "same_odd_total", "same_strided_dilated"):
            for seed in range(20):
                cfg = conv_config(ndim, case, seed)
                for n, k, s, d in zip(
                    cfg["input_size"],
                    cfg["kernel_size"],
                    cfg["stride"],
                    cfg["dilation"],
                    strict=True,
                ):
                    before, after = keras_pads(n, k, s, d, "same")
                    parities.add((case, (before + after) % 2))
    assert ("same_even_total", 0) in parities and ("same_odd_total", 1) in parities
    assert {("same_strided_dilated", 0), ("same_strided_dilated", 1)} <= parities


@pytest.mark.parametrize("biases", list(BIASES))
@pytest.mark.parametrize("acts", ACTIVATION_PAIRS, ids=["linear-linear", "relu-softmax"])
@pytest.mark.parametrize(("ndim", "case"), conv_cases())
def test_conv_moe_matches_reference(ndim: int, case: str, acts: tuple, biases: str) -> None:
    seed = (
        1000 * ndim
        + 10 * list(CONV_CASES).index(case)
        + 4 * ACTIVATION_PAIRS.index(acts)
        + list(BIASES).index(biases)
    )
    cfg = conv_config(ndim, case, seed)
    torch.manual_seed(seed)
    layer = build_conv(
        cfg,
        expert_activation=acts[0],
        gating_activation=acts[1],
        use_expert_bias=BIASES[biases][0],
        use_gating_bias=BIASES[biases][1],
    ).double()
    spread_parameters(layer, seed)
    x = torch.randn(cfg["batch"], cfg["in_channels"], *cfg["input_size"], dtype=torch.float64)

    y = layer(x)

    # Keras output lengths, computed here from Keras' formulas
    padding = cfg["padding"]
    expected_size = tuple(
        keras_out_len(n, k, s, d, padding if isinstance(padding, str) else padding[i])
        for i, (n, k, s, d) in enumerate(
            zip(cfg["input_size"], cfg["kernel_size"], cfg["stride"], cfg["dilation"], strict=True)
        )
    )
    assert y.shape == (cfg["batch"], cfg["out_channels"], *expected_size)
    assert layer.output_size == expected_size

    ref = conv_moe_reference(x, params_of(layer), cfg, *acts)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("biases", list(BIASES))
@pytest.mark.parametrize("acts", ACTIVATION_PAIRS, ids=["linear-linear", "relu-softmax"])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 3)], ids=["1lead", "2lead", "3lead"])
def test_dense_moe_matches_reference(lead: tuple[int, ...], acts: tuple, biases: str) -> None:
    seed = len(lead) * 10 + ACTIVATION_PAIRS.index(acts) * 4 + list(BIASES).index(biases)
    rng = random.Random(seed)
    n_in, n_out, k = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 4)
    torch.manual_seed(seed)
    layer = DenseMoE(
        n_in,
        n_out,
        k,
        expert_activation=acts[0],
        gating_activation=acts[1],
        use_expert_bias=BIASES[biases][0],
        use_gating_bias=BIASES[biases][1],
    ).double()
    spread_parameters(layer, seed)
    x = torch.randn(*lead, n_in, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, n_out)
    torch.testing.assert_close(
        y, dense_moe_reference(x, params_of(layer), *acts), rtol=1e-10, atol=1e-10
    )


def test_dense_moe_unbatched_and_empty_inputs() -> None:
    layer = DenseMoE(4, 3, 2, expert_activation="relu", gating_activation="softmax").double()
    spread_parameters(layer, 0)
    x = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(
        layer(x), dense_moe_reference(x, params_of(layer), "relu", "softmax")
    )
    assert layer(torch.randn(0, 7, 4, dtype=torch.float64)).shape == (0, 7, 3)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_conv_moe_empty_batch(ndim: int) -> None:
    cfg = conv_config(ndim, "same_odd_total", 0)
    layer = build_conv(cfg, expert_activation="relu", gating_activation="softmax")
    y = layer(torch.randn(0, cfg["in_channels"], *cfg["input_size"]))
    assert y.shape == (0, cfg["out_channels"], *layer.output_size)


def test_expert_softmax_normalises_over_experts() -> None:
    """The agreed reading of the original (Keras softmax on the last axis, which is the experts axis):
    as an expert activation too, softmax runs over the K experts of each unit/filter."""
    torch.manual_seed(0)
    dense = DenseMoE(3, 4, 3, expert_activation="softmax", gating_activation="tanh").double()
    spread_parameters(dense, 1)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(
        dense(x), dense_moe_reference(x, params_of(dense), "softmax", "tanh")
    )

    cfg = conv_config(2, "same_odd_total", 3)
    conv = build_conv(cfg, expert_activation="softmax", gating_activation="tanh").double()
    spread_parameters(conv, 2)
    x = torch.randn(cfg["batch"], cfg["in_channels"], *cfg["input_size"], dtype=torch.float64)
    torch.testing.assert_close(
        conv(x), conv_moe_reference(x, params_of(conv), cfg, "softmax", "tanh")
    )


def test_conv_one_kernel_reference_against_hand_computed_1d() -> None:
    """The reference convolution itself, on numbers small enough to check by eye: x = 1..5,
    kernel (1, 10), dilation 2, stride 2, Keras 'same' (total (k-1)d = 2, one zero each side)."""
    x = torch.arange(1.0, 6.0).view(1, 1, 5)
    w = torch.tensor([[1.0, 10.0]])
    pads = [keras_pads(5, 2, 2, 2, "same")]
    assert pads == [(1, 1)]
    # padded: 0 1 2 3 4 5 0; outputs at p = 0, 2, 4: x_pad[p] + 10 x_pad[p + 2]
    expected = torch.tensor([[0 + 10 * 2, 2 + 10 * 4, 4 + 10 * 0]], dtype=torch.float32)
    torch.testing.assert_close(conv_one_kernel(x, w, (2,), (2,), pads), expected)


# ---------------------------------------------------------------------------------------------
# The original's Keras layouts map onto ours by a fixed permutation
# ---------------------------------------------------------------------------------------------


def channels_last_conv_keras_layout(x_cl: Tensor, kernel: Tensor, cfg: dict) -> Tensor:
    """Keras Conv{1,2,3}D, channels last: ``x_cl (B, *S, C)``, kernel ``(*ks, C, O)`` -> ``(B, *S', O)``."""
    ndim = x_cl.dim() - 2
    pads = per_dim_pads(cfg)
    batch, *size, channels = x_cl.shape
    padded = x_cl.new_zeros(
        batch, *(n + a + b for n, (a, b) in zip(size, pads, strict=True)), channels
    )
    padded[(slice(None), *(slice(a, a + n) for n, (a, _) in zip(size, pads, strict=True)))] = x_cl
    ks = kernel.shape[:ndim]
    out_size = [
        (n - (k - 1) * d - 1) // s + 1
        for n, k, s, d in zip(padded.shape[1:-1], ks, cfg["stride"], cfg["dilation"], strict=True)
    ]
    out = x_cl.new_zeros(batch, *out_size, kernel.shape[-1])
    for offset in itertools.product(*(range(k) for k in ks)):
        window = tuple(
            slice(o * d, o * d + (m - 1) * s + 1, s)
            for o, d, m, s in zip(offset, cfg["dilation"], out_size, cfg["stride"], strict=True)
        )
        out = out + padded[(slice(None), *window, slice(None))] @ kernel[offset]  # (.., C) @ (C, O)
    return out


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_original_conv_weights_map_by_fixed_permutation(ndim: int) -> None:
    """The original (Keras, channels last): expert_kernel (*ks, C, out*K) with channel f*K + k, gating_kernel
    (prod(*S, C) in (*S, C) order, out, K). Ours: expert_kernel.permute = (out*K, C, *ks), gating
    kernel (C, *S, out, K). Build its weights, compute its forward channels-last, load the
    permuted weights into our layer, compare."""
    cfg = conv_config(ndim, "same_strided_dilated", 40 + ndim)
    cfg.update(in_channels=3, out_channels=2, n_experts=3)
    c, out, k, size, ks = 3, 2, 3, cfg["input_size"], cfg["kernel_size"]
    gen = torch.Generator().manual_seed(ndim)
    keras_expert = torch.randn(*ks, c, out * k, generator=gen, dtype=torch.float64)
    keras_gating = (
        torch.randn(math.prod(size) * c, out, k, generator=gen, dtype=torch.float64) * 0.3
    )
    keras_expert_bias = torch.randn(out, k, generator=gen, dtype=torch.float64)
    keras_gating_bias = torch.randn(out, k, generator=gen, dtype=torch.float64)
    x_cl = torch.randn(2, *size, c, generator=gen, dtype=torch.float64)

    # the original's forward, channels last
    hidden = channels_last_conv_keras_layout(x_cl, keras_expert, cfg)  # (B, *S', out*K)
    hidden = hidden.unflatten(-1, (out, k)) + keras_expert_bias
    hidden = hidden.clamp_min(0)
    logits = x_cl.reshape(2, -1) @ keras_gating.reshape(-1, out * k)
    gates = softmax_by_hand(logits.view(2, out, k) + keras_gating_bias, -1)
    y_keras = (hidden * gates.view(2, *[1] * ndim, out, k)).sum(-1)  # (B, *S', out)

    # the fixed permutation onto our layout
    ours = {
        "expert_kernel": keras_expert.permute(ndim + 1, ndim, *range(ndim)),
        "gating_kernel": keras_gating.reshape(*size, c, out, k).permute(
            ndim, *range(ndim), ndim + 1, ndim + 2
        ),
        "expert_bias": keras_expert_bias,
        "gating_bias": keras_gating_bias,
    }
    layer = build_conv(cfg, expert_activation="relu", gating_activation="softmax").double()
    layer.load_state_dict(ours)
    y = layer(x_cl.movedim(-1, 1))
    torch.testing.assert_close(y, y_keras.movedim(-1, 1), rtol=1e-10, atol=1e-10)


def test_original_dense_weights_are_our_layout() -> None:
    """Dense: the original's expert_kernel (in, units, K), gating_kernel (in, K), expert_bias
    (units, K), gating_bias (K,) load as they are."""
    gen = torch.Generator().manual_seed(0)
    keras = {
        "expert_kernel": torch.randn(4, 3, 2, generator=gen, dtype=torch.float64),
        "gating_kernel": torch.randn(4, 2, generator=gen, dtype=torch.float64),
        "expert_bias": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "gating_bias": torch.randn(2, generator=gen, dtype=torch.float64),
    }
    layer = DenseMoE(4, 3, 2, expert_activation="relu", gating_activation="softmax").double()
    layer.load_state_dict(keras)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    # the original's forward: K.dot(x, W) over (in, units, K), softmax over K, weighted sum over K
    hidden = torch.einsum("ni,iuk->nuk", x, keras["expert_kernel"]) + keras["expert_bias"]
    gates = softmax_by_hand(x @ keras["gating_kernel"] + keras["gating_bias"], -1)
    expected = (hidden.clamp_min(0) * gates[:, None, :]).sum(-1)
    torch.testing.assert_close(layer(x), expected)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _gradcheck_layer(layer: nn.Module, x: Tensor) -> None:
    names = [n for n, _ in layer.named_parameters()]
    values = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def fn(inp: Tensor, *flat: Tensor) -> Tensor:
        return torch.func.functional_call(layer, dict(zip(names, flat, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *values), eps=1e-6, atol=1e-7)


GRADCHECK_LAYERS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "dense": lambda: (
        DenseMoE(3, 2, 3, expert_activation="relu", gating_activation="softmax"),
        (2, 2, 3),
    ),
    "dense-linear-nobias": lambda: (DenseMoE(3, 2, 2, use_expert_bias=False), (4, 3)),
    "conv1d-causal": lambda: (
        Conv1dMoE(
            2,
            2,
            2,
            3,
            6,
            padding="causal",
            stride=2,
            dilation=2,
            expert_activation="tanh",
            gating_activation="softmax",
        ),
        (2, 2, 6),
    ),
    "conv2d-same-odd": lambda: (
        Conv2dMoE(
            2,
            2,
            2,
            2,
            (4, 3),
            padding="same",
            expert_activation="relu",
            gating_activation="softmax",
        ),
        (2, 2, 4, 3),
    ),
    "conv3d-valid": lambda: (
        Conv3dMoE(1, 2, 2, (2, 1, 2), (3, 2, 3), stride=(1, 1, 2), gating_activation="sigmoid"),
        (2, 1, 3, 2, 3),
    ),
}


@pytest.mark.parametrize("name", list(GRADCHECK_LAYERS))
def test_gradcheck_float64(name: str) -> None:
    torch.manual_seed(0)
    layer, shape = GRADCHECK_LAYERS[name]()
    layer = layer.double()
    spread_parameters(layer, 0)
    _gradcheck_layer(layer, torch.randn(shape, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Initialisation statistics (the original's uniform limits for dense, normal std for conv)
# ---------------------------------------------------------------------------------------------


def _excess_kurtosis(t: Tensor) -> float:
    z = (t.double() - t.double().mean()) / t.double().std()
    return float((z**4).mean() - 3)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_dense_init_uniform_limits(scale: float) -> None:
    n_in, n_out, k = 300, 200, 4
    torch.manual_seed(0)
    layer = DenseMoE(
        n_in, n_out, k, expert_kernel_initializer_scale=scale, gating_kernel_initializer_scale=scale
    )
    big_gate = DenseMoE(n_in, 1, 64, gating_kernel_initializer_scale=scale)  # more gate samples
    for w, fan in (
        (layer.expert_kernel, (n_in + n_out) / 2),
        (big_gate.gating_kernel, (n_in + 1) / 2),
    ):
        limit = math.sqrt(3 * scale / max(1.0, fan))
        w = w.detach()
        assert -limit <= w.min() < -0.99 * limit
        assert 0.99 * limit < w.max() <= limit
        assert abs(w.std().item() / (limit / math.sqrt(3)) - 1) < 0.03  # uniform std: limit/sqrt(3)
        assert abs(w.mean().item()) < 4 * limit / math.sqrt(3 * w.numel())
        assert abs(_excess_kurtosis(w) + 1.2) < 0.1  # a uniform distribution's -1.2
    assert not layer.expert_bias.any() and not layer.gating_bias.any()  # default zeros


def test_dense_init_fan_is_at_least_one() -> None:
    """max(1, fan): a 1-in, 1-out layer has fan 1 (not 1 as an average below 1 would give)."""
    torch.manual_seed(0)
    w = DenseMoE(1, 1, 4096).expert_kernel.detach()
    assert 0.99 * math.sqrt(3) < w.abs().max() <= math.sqrt(3)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_conv_init_normal_std(scale: float) -> None:
    c, out, k, ks, size = 8, 32, 4, (3, 3), (16, 16)
    torch.manual_seed(0)
    layer = Conv2dMoE(
        c,
        out,
        k,
        ks,
        size,
        expert_kernel_initializer_scale=scale,
        gating_kernel_initializer_scale=scale,
    )
    for w, fan in (
        (layer.expert_kernel, c * math.prod(ks)),
        (layer.gating_kernel, c * math.prod(size)),
    ):
        std = scale / math.sqrt(fan)
        w = w.detach()
        assert abs(w.std().item() / std - 1) < 0.04
        assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel())
        assert abs(_excess_kurtosis(w)) < 0.25  # normal, not uniform (-1.2)
        assert w.abs().max() > 3 * std  # tails a bounded distribution of this std would not have
    assert not layer.expert_bias.any() and not layer.gating_bias.any()


def test_conv3d_and_conv1d_init_use_their_own_fans() -> None:
    torch.manual_seed(0)
    layer3 = Conv3dMoE(4, 16, 4, (3, 2, 3), (6, 7, 8))
    layer1 = Conv1dMoE(5, 64, 4, 7, 300)
    for layer, fan_e, fan_g in ((layer3, 4 * 18, 4 * 6 * 7 * 8), (layer1, 5 * 7, 5 * 300)):
        assert abs(layer.expert_kernel.std().item() * math.sqrt(fan_e) - 1) < 0.06
        assert abs(layer.gating_kernel.std().item() * math.sqrt(fan_g) - 1) < 0.04


# ---------------------------------------------------------------------------------------------
# A normal torch module
# ---------------------------------------------------------------------------------------------


def small_layers() -> dict[
    str, tuple[nn.Module, tuple[int, ...], Callable[[Tensor, nn.Module], Tensor]]
]:
    """name -> (layer, input shape, float64 reference forward)."""
    torch.manual_seed(0)
    cfgs = {nd: conv_config(nd, "same_strided_dilated", 7 * nd) for nd in (1, 2, 3)}
    out = {
        "dense": (
            DenseMoE(5, 4, 3, expert_activation="relu", gating_activation="softmax"),
            (2, 3, 5),
            lambda x, m: dense_moe_reference(x, params_of(m), "relu", "softmax"),
        )
    }
    for nd, cfg in cfgs.items():
        out[f"conv{nd}d"] = (
            build_conv(cfg, expert_activation="relu", gating_activation="softmax"),
            (cfg["batch"] + 1, cfg["in_channels"], *cfg["input_size"]),
            lambda x, m, cfg=cfg: conv_moe_reference(x, params_of(m), cfg, "relu", "softmax"),
        )
    for name, (layer, _, _) in out.items():
        spread_parameters(layer, len(name))
    return out


def _reference_in_float64(layer: nn.Module, x: Tensor, ref: Callable) -> Tensor:
    layer64 = copy.deepcopy(layer).double()
    return ref(x.double(), layer64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["dense", "conv1d", "conv2d", "conv3d"])
def test_dtypes(name: str, dtype: torch.dtype) -> None:
    layer, shape, ref = small_layers()[name]
    layer = layer.to(dtype)
    x = torch.randn(shape).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    expected = _reference_in_float64(layer, x, ref)
    torch.testing.assert_close(
        y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item()
    )
    y.float().square().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", ["dense", "conv2d"])
def test_autocast_bfloat16_on_float32_weights(name: str) -> None:
    layer, shape, ref = small_layers()[name]
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.last_gates.dtype == torch.bfloat16
    expected = _reference_in_float64(layer, x, ref)
    torch.testing.assert_close(
        y.double(), expected, rtol=5e-2, atol=5e-2 * expected.abs().max().item()
    )
    y.float().sum().backward()
    assert layer.expert_kernel.grad.dtype == torch.float32


@pytest.mark.parametrize("name", ["conv2d", "conv3d"])
def test_channels_last_input(name: str) -> None:
    layer, shape, ref = small_layers()[name]
    layer = layer.double()
    fmt = torch.channels_last if name == "conv2d" else torch.channels_last_3d
    x = torch.randn(shape, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=fmt)
    assert not x_cl.is_contiguous()

    y_cl = layer(x_cl)
    torch.testing.assert_close(y_cl, ref(x, layer), rtol=1e-10, atol=1e-10)
    # the output keeps the input's format exactly when nn.Conv's would (float64 Conv3d on CPU
    # does not), and always in float32
    conv = (nn.Conv2d if name == "conv2d" else nn.Conv3d)(x.shape[1], 2, 1).double()
    assert y_cl.is_contiguous(memory_format=fmt) == conv(x_cl).is_contiguous(memory_format=fmt)
    grads_cl = torch.autograd.grad(y_cl.square().sum(), list(layer.parameters()))
    grads = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    for g_cl, g in zip(grads_cl, grads, strict=True):
        torch.testing.assert_close(g_cl, g, rtol=1e-10, atol=1e-10)
    assert layer.float()(x_cl.float()).is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name", ["conv1d", "conv2d"])
def test_module_to_channels_last(name: str) -> None:
    """model.to(memory_format=torch.channels_last) (the usual channels_last recipe) converts the
    expert kernel as nn.Conv's weight, and leaves the gating kernel, which is no image, alone."""
    layer, shape, _ = small_layers()[name]
    x = torch.randn(shape)
    expected = layer(x)
    model = nn.Sequential(layer).to(memory_format=torch.channels_last)
    assert layer.gating_kernel.is_contiguous()
    if name == "conv2d":
        assert layer.expert_kernel.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x), expected)
    layer.double()
    assert layer.gating_kernel.dtype == torch.float64 and layer.gating_kernel.is_contiguous()


@pytest.mark.slow  # compiling takes 10-30 s on 2 busy CPU cores
def test_torch_compile_small_sequential() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dMoE(
            1,
            2,
            2,
            3,
            (6, 6),
            padding="same",
            expert_activation="relu",
            gating_activation="softmax",
        ),
        nn.Flatten(),
        DenseMoE(72, 3, 2, expert_activation="relu", gating_activation="softmax"),
    )
    x = torch.randn(4, 1, 6, 6)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    start = time.perf_counter()
    # a fresh dynamo cache: another test's compile of the same layer code with other shapes
    # would make this one dynamic-shaped (which inductor cannot lower for these layers yet)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    y = compiled(x)
    grads = torch.autograd.grad(y.sum(), list(model.parameters()))
    elapsed = time.perf_counter() - start
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert model[0].last_gates.shape == (4, 2, 2)  # the side effect survives compilation
    print(f"torch.compile + first call: {elapsed:.1f} s")


@pytest.mark.parametrize("name", ["dense", "conv1d", "conv2d", "conv3d"])
def test_state_dict_round_trip(name: str) -> None:
    layer, shape, _ = small_layers()[name]
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)
    fresh = copy.deepcopy(layer)
    fresh.reset_parameters()
    x = torch.randn(shape)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert list(layer.state_dict()) == [
        "expert_kernel",
        "gating_kernel",
        "expert_bias",
        "gating_bias",
    ]


def test_state_dict_shapes_without_biases() -> None:
    layer = Conv2dMoE(3, 4, 2, (3, 1), (5, 6), use_expert_bias=False, use_gating_bias=False)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"expert_kernel": (8, 3, 3, 1), "gating_kernel": (3, 5, 6, 4, 2)}
    assert layer.expert_bias is None and layer.gating_bias is None
    assert DenseMoE(3, 4, 2, use_gating_bias=False).state_dict()["expert_bias"].shape == (4, 2)


@pytest.mark.parametrize("name", ["dense", "conv1d", "conv2d", "conv3d"])
def test_seeded_initialisation_and_reset_parameters(name: str) -> None:
    template, _, _ = small_layers()[name]
    cls, args = type(template), _ctor_args(template)

    def make() -> nn.Module:
        return cls(
            **args,
            expert_bias_initializer="random_uniform",
            gating_bias_initializer="random_normal",
        )

    torch.manual_seed(5)
    a = make()
    torch.manual_seed(5)
    b = make()
    torch.manual_seed(6)
    c = make()
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), n
        assert not torch.equal(pa, pc), n
    with torch.no_grad():
        for p in a.parameters():
            p.fill_(3.0)
    torch.manual_seed(5)
    a.reset_parameters()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def _ctor_args(layer: nn.Module) -> dict:
    if isinstance(layer, DenseMoE):
        return {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "n_experts": layer.n_experts,
        }
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "n_experts": layer.n_experts,
        "kernel_size": layer.kernel_size,
        "input_size": layer.input_size,
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
    }


def test_extra_repr_is_informative() -> None:
    conv = Conv2dMoE(
        3,
        32,
        2,
        3,
        (32, 32),
        stride=2,
        padding="same",
        dilation=(1, 2),
        expert_activation="relu",
        gating_activation="softmax",
        expert_kernel_regularizer="l2",
        gating_kernel_constraint="max_norm",
        use_gating_bias=False,
    )
    text = repr(conv)
    for part in (
        "Conv2dMoE(3, 32",
        "kernel_size=(3, 3)",
        "input_size=(32, 32)",
        "stride=(2, 2)",
        "padding='same'",
        "dilation=(1, 2)",
        "n_experts=2",
        "expert_activation=relu",
        "gating_activation=softmax",
        "use_gating_bias=False",
        "expert_kernel",
        "gating_kernel",
    ):
        assert part in text, (part, text)
    dense = repr(DenseMoE(128, 64, 20, gating_activation="softmax"))
    for part in (
        "in_features=128",
        "out_features=64",
        "n_experts=20",
        "expert_activation=linear",
        "gating_activation=softmax",
    ):
        assert part in dense, (part, dense)


@pytest.mark.parametrize("name", ["dense", "conv2d"])
def test_deepcopy_and_pickle_after_forward(name: str) -> None:
    """The gates and activity penalty of the last forward are graph tensors; copying or pickling
    the module (EMA/SWA copies, torch.save(model)) must not trip over them."""
    layer, shape, _ = small_layers()[name]
    layer = type(layer)(
        **_ctor_args(layer), activity_regularizer="l2", expert_bias_initializer="random_normal"
    )
    x = torch.randn(shape)
    y = layer(x)
    clone = copy.deepcopy(layer)
    restored = pickle.loads(pickle.dumps(layer))
    assert clone.last_gates is None and restored.last_gates is None
    torch.testing.assert_close(clone(x), y)
    torch.testing.assert_close(restored(x), y)
    torch.testing.assert_close(restored.regularization_loss(), layer.regularization_loss())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["dense", "conv1d", "conv2d", "conv3d"])
def test_cuda_matches_cpu_reference(name: str) -> None:
    layer, shape, ref = small_layers()[name]
    x = torch.randn(shape)
    expected = _reference_in_float64(layer, x, ref)
    layer = layer.cuda()
    y = layer(x.cuda())
    torch.testing.assert_close(
        y.double().cpu(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()
    )
    with torch.autocast("cuda", dtype=torch.float16):
        y16 = layer(x.cuda())
    assert y16.dtype == torch.float16
    torch.testing.assert_close(
        y16.double().cpu(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()
    )
    y.sum().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in layer.parameters())
