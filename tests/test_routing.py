"""Top-k routing, sparse compute, kernel mixing and pooled gates of the MoE layers, against
references written here with explicit loops over samples, filters and kept experts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE, MoEBase

CONV = {1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}
TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
ACT = {"linear": lambda t: t, "relu": torch.relu, "tanh": torch.tanh}


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def kept_gates(logits: Tensor, top_k: int | None) -> tuple[list[int], Tensor]:
    """One gate group's logits (K,) -> kept experts and their gates, by the documented rule:
    softmax over the kept logits; for k = 1 the chosen expert's softmax probability over all K."""
    if top_k is None or top_k == logits.numel():
        return list(range(logits.numel())), torch.softmax(logits, 0)
    order = sorted(range(logits.numel()), key=lambda e: -logits[e].item())[:top_k]
    if top_k == 1:
        return order, torch.softmax(logits, 0)[order]
    return order, torch.softmax(logits[order], 0)


def keras_pads(padding, size, kernel, stride, dilation):
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        span = (k - 1) * d + 1
        if padding == "valid":
            pads.append((0, 0))
        elif padding == "causal":
            pads.append((span - 1, 0))
        elif padding == "same":
            total = max((math.ceil(n / s) - 1) * s + span - n, 0)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((padding, padding))
    return pads


def conv_reference(layer, x: Tensor, cfg: dict) -> Tensor:
    """Loop over samples b, filters f and kept experts: one single-kernel convolution each."""
    k_exp, out = layer.n_experts, layer.out_channels
    if cfg["gate_input"] == "pooled":
        feats = x.mean(dim=tuple(range(2, x.dim())))  # (B, C)
        logits = torch.einsum("bc,cfk->bfk", feats, layer.gating_kernel)
    else:
        logits = (x.reshape(x.shape[0], -1) @ layer.gating_kernel.reshape(-1, out * k_exp)).view(
            -1, out, k_exp
        )
    if layer.gating_bias is not None:
        logits = logits + layer.gating_bias
    ndim = x.dim() - 2
    pads = keras_pads(cfg["padding"], x.shape[2:], cfg["kernel_size"], cfg["stride"],
                      cfg["dilation"])  # fmt: skip
    xp = F.pad(x, [p for pair in reversed(pads) for p in pair])
    act = ACT[cfg["act"]]
    outputs = []
    for b in range(x.shape[0]):
        filters = []
        for f in range(out):
            experts, gates = kept_gates(logits[b, f], cfg["top_k"])
            acc = 0.0
            for j, e in enumerate(experts):
                kernel = layer.expert_kernel[f * k_exp + e].unsqueeze(0)
                h = TORCH_CONV[ndim](xp[b : b + 1], kernel, None, cfg["stride"], 0,
                                     cfg["dilation"])[0, 0]  # fmt: skip
                if layer.expert_bias is not None:
                    h = h + layer.expert_bias[f, e]
                acc = acc + gates[j] * act(h)
            filters.append(acc)
        outputs.append(torch.stack(filters))
    return torch.stack(outputs)


def dense_reference(layer: DenseMoE, x: Tensor, top_k: int | None, act: str) -> Tensor:
    """Loop over rows and kept experts: one matmul with that expert's (in, out) matrix each."""
    flat = x.reshape(-1, layer.in_features)
    rows = []
    for i in range(flat.shape[0]):
        logits = flat[i] @ layer.gating_kernel
        if layer.gating_bias is not None:
            logits = logits + layer.gating_bias
        experts, gates = kept_gates(logits, top_k)
        acc = 0.0
        for j, e in enumerate(experts):
            h = flat[i] @ layer.expert_kernel[:, :, e]
            if layer.expert_bias is not None:
                h = h + layer.expert_bias[:, e]
            acc = acc + gates[j] * ACT[act](h)
        rows.append(acc)
    return torch.stack(rows).view(*x.shape[:-1], layer.out_features)


def grads(out: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    torch.manual_seed(123)
    return list(torch.autograd.grad(out, tensors, torch.randn_like(out)))


def assert_same_values_and_grads(layer: MoEBase, x: Tensor, y: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    tensors = [x, *layer.parameters()]
    for got, want in zip(grads(y, tensors), grads(expected, tensors), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Sparse top-k against the references
# ---------------------------------------------------------------------------------------------

CONV_CASES = {
    "1d_causal_stride2_full": dict(ndim=1, size=(9,), kernel_size=(3,), stride=(2,),
        dilation=(1,), padding="causal", k=4, top_k=2, bias=True, act="relu", gate_input="full"),
    "1d_same_dilated_pooled_top1": dict(ndim=1, size=(8,), kernel_size=(3,), stride=(1,),
        dilation=(2,), padding="same", k=3, top_k=1, bias=False, act="tanh", gate_input="pooled"),
    "2d_same_stride_pooled": dict(ndim=2, size=(7, 6), kernel_size=(3, 2), stride=(2, 1),
        dilation=(1, 1), padding="same", k=4, top_k=2, bias=True, act="tanh", gate_input="pooled"),
    "2d_int_padding_full_top3": dict(ndim=2, size=(5, 5), kernel_size=(3, 3), stride=(1, 1),
        dilation=(1, 1), padding=1, k=5, top_k=3, bias=False, act="relu", gate_input="full"),
    "3d_valid_full": dict(ndim=3, size=(4, 3, 5), kernel_size=(2, 2, 2), stride=(1, 1, 1),
        dilation=(1, 1, 1), padding="valid", k=3, top_k=2, bias=True, act="relu",
        gate_input="full"),
    "3d_same_stride_pooled_top1": dict(ndim=3, size=(5, 4, 4), kernel_size=(3, 3, 2),
        stride=(2, 2, 1), dilation=(1, 1, 1), padding="same", k=4, top_k=1, bias=True,
        act="linear", gate_input="pooled"),
}  # fmt: skip


def build_conv(cfg: dict, **overrides) -> MoEBase:
    kwargs = dict(
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        expert_activation=cfg["act"],
        gating_activation="softmax",
        use_expert_bias=cfg["bias"],
        use_gating_bias=cfg["bias"],
        top_k=cfg["top_k"],
        gate_input=cfg["gate_input"],
        gating_kernel_initializer_scale=3.0,  # spread the logits: distinct top-k choices
        expert_bias_initializer="random_normal",
        gating_bias_initializer="random_normal",
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return CONV[cfg["ndim"]](2, 3, cfg["k"], cfg["kernel_size"], cfg["size"], **kwargs).double()


@pytest.mark.parametrize("backend", ["channels", "auto"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_sparse_conv_matches_loop_reference(name: str, backend: str) -> None:
    cfg = CONV_CASES[name]
    layer = build_conv(cfg, expert_backend=backend)
    torch.manual_seed(1)
    x = torch.randn(3, 2, *cfg["size"], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    expected = conv_reference(layer, x, cfg)
    assert_same_values_and_grads(layer, x, y, expected)
    # each filter of each sample keeps top_k experts
    assert (layer.last_gates > 0).sum(-1).eq(cfg["top_k"]).all()


@pytest.mark.parametrize("name", [n for n, c in CONV_CASES.items() if c["act"] == "linear"])
def test_sparse_conv_kernel_mix_matches_loop_reference(name: str) -> None:
    cfg = CONV_CASES[name]
    layer = build_conv(cfg, expert_backend="kernel_mix")
    x = torch.randn(3, 2, *cfg["size"], dtype=torch.float64, requires_grad=True)
    assert_same_values_and_grads(layer, x, layer(x), conv_reference(layer, x, cfg))


@pytest.mark.parametrize(
    ("top_k", "bias", "act"),
    [
        (1, True, "relu"),
        (2, False, "tanh"),
        (3, True, "linear"),
        (1, False, "linear"),
        (2, True, "relu"),
        (2, False, "linear"),
    ],
)
def test_sparse_dense_matches_loop_reference(top_k: int, bias: bool, act: str) -> None:
    torch.manual_seed(0)
    layer = DenseMoE(
        6, 4, 5, expert_activation=act, top_k=top_k, use_expert_bias=bias, use_gating_bias=bias,
        gating_kernel_initializer_scale=3.0, expert_bias_initializer="random_normal",
    ).double()  # fmt: skip
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 7, 4)
    assert_same_values_and_grads(layer, x, y, dense_reference(layer, x, top_k, act))


def test_sparse_dense_routes_rows_unevenly_and_skips_unused_experts() -> None:
    """Experts with no rows (and one with all but one) still give exact values and zero grads."""
    torch.manual_seed(0)
    layer = DenseMoE(3, 2, 4, top_k=1).double()
    with torch.no_grad():
        layer.gating_kernel.zero_()
        layer.gating_kernel[0, 2] = 10.0  # x[0] > 0 -> expert 2
        layer.gating_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # else expert 3
    x = torch.tensor([[1.0, 0.5, 0.1], [2.0, 0.0, 1.0], [-1.0, 1.0, 0.0], [0.3, 0.2, 0.1]],
                     dtype=torch.float64, requires_grad=True)  # fmt: skip
    y = layer(x)
    assert_same_values_and_grads(layer, x, y, dense_reference(layer, x, 1, "linear"))
    layer(x).sum().backward()
    assert layer.expert_kernel.grad[:, :, :2].eq(0).all()  # experts 0 and 1 got no rows
    assert layer.expert_kernel.grad[:, :, 2:].ne(0).any()


# ---------------------------------------------------------------------------------------------
# top_k = n_experts is the dense softmax mixture; kernel_mix equals channels for linear experts
# ---------------------------------------------------------------------------------------------


def small_layer(ndim: int, **kwargs) -> tuple[MoEBase, tuple[int, ...]]:
    torch.manual_seed(0)
    if ndim == 0:
        return DenseMoE(5, 4, 3, **kwargs).double(), (6, 5)
    size = {1: (7,), 2: (5, 6), 3: (4, 5, 3)}[ndim]
    layer = CONV[ndim](2, 3, 3, 3, size, padding="same", stride=2, **kwargs)
    return layer.double(), (4, 2, *size)


@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
def test_top_k_equal_to_n_experts_is_the_dense_softmax_mixture(ndim: int) -> None:
    dense, shape = small_layer(ndim, expert_activation="relu", gating_activation="softmax")
    routed, _ = small_layer(ndim, expert_activation="relu", top_k=3)
    routed.load_state_dict(dense.state_dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = routed(x)
    expected = dense(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(
        grads(y, [x, *routed.parameters()]), grads(expected, [x, *dense.parameters()]), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_kernel_mix_equals_channels_for_linear_experts(ndim: int, top_k: int | None) -> None:
    channels, shape = small_layer(ndim, gating_activation="softmax", top_k=top_k,
                                  expert_backend="channels",
                                  expert_bias_initializer="random_normal")  # fmt: skip
    mixed, _ = small_layer(ndim, gating_activation="softmax", top_k=top_k,
                           expert_backend="kernel_mix")  # fmt: skip
    mixed.load_state_dict(channels.state_dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = mixed(x)
    expected = channels(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(
        grads(y, [x, *mixed.parameters()]), grads(expected, [x, *channels.parameters()]),
        strict=True,
    ):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_auto_backend_rule() -> None:
    """kernel_mix exactly when exact (linear experts), >= 2 experts computed per filter and
    >= 32 output positions."""
    linear = Conv2dMoE(8, 4, 4, 3, (16, 16), padding="same", gating_activation="softmax")
    relu = Conv2dMoE(8, 4, 4, 3, (16, 16), padding="same", expert_activation="relu")
    top1 = Conv2dMoE(8, 4, 4, 3, (16, 16), padding="same", top_k=1)
    top2 = Conv2dMoE(8, 4, 4, 3, (16, 16), padding="same", top_k=2)
    forced = Conv2dMoE(8, 4, 4, 3, (16, 16), padding="same", expert_backend="channels")
    assert linear.expert_backend_for((16, 16), dense_gates=True) == "kernel_mix"
    assert linear.expert_backend_for((4, 8), dense_gates=True) == "kernel_mix"
    assert linear.expert_backend_for((4, 7), dense_gates=True) == "channels"  # 28 positions
    assert relu.expert_backend_for((16, 16), dense_gates=True) == "channels"  # not exact
    assert top1.expert_backend_for((16, 16), dense_gates=False) == "channels"  # nothing to save
    assert top2.expert_backend_for((16, 16), dense_gates=False) == "kernel_mix"
    assert forced.expert_backend_for((16, 16), dense_gates=True) == "channels"


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [0, 2])
def test_top1_gating_kernel_gets_a_gradient_from_the_output(ndim: int) -> None:
    layer, shape = small_layer(ndim, expert_activation="relu", top_k=1)
    x = torch.randn(shape, dtype=torch.float64)
    layer(x).square().sum().backward()
    assert layer.gating_kernel.grad.abs().sum() > 0
    assert layer.gating_bias.grad.abs().sum() > 0


def stable_top_k_layer(ndim: int) -> tuple[MoEBase, tuple[int, ...]]:
    """Small float64 layers whose gating biases are far apart, so the kept experts do not
    change under gradcheck's perturbations (top-k selection is piecewise)."""
    layer, shape = small_layer(ndim, expert_activation="tanh", top_k=2,
                               gating_kernel_initializer_scale=0.01)  # fmt: skip
    with torch.no_grad():
        layer.gating_bias.copy_(torch.tensor([0.0, 2.0, 4.0]).expand_as(layer.gating_bias))
    return layer, shape


@pytest.mark.parametrize("ndim", [0, 2])
def test_gradcheck_top_k(ndim: int) -> None:
    layer, shape = stable_top_k_layer(ndim)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def fn(x: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Pooled gates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_pooled_gates_work_at_any_resolution(ndim: int) -> None:
    torch.manual_seed(0)
    layer = CONV[ndim](2, 3, 4, 3, None, padding="same", gate_input="pooled",
                       expert_activation="relu", gating_activation="softmax").double()  # fmt: skip
    assert layer.input_size is None and layer.output_size is None
    assert layer.gating_kernel.shape == (2, 3, 4)
    cfg = dict(gate_input="pooled", padding="same", kernel_size=(3,) * ndim, stride=(1,) * ndim,
               dilation=(1,) * ndim, act="relu", top_k=None)  # fmt: skip
    for size in ((6,) * ndim, (9, 4, 5)[:ndim]):
        x = torch.randn(2, 2, *size, dtype=torch.float64)
        y = layer(x)
        assert y.shape == (2, 3, *size)
        # gates: mean over the spatial positions, then a matmul (hand reference)
        pooled = x.reshape(2, 2, -1).mean(-1)
        logits = (pooled @ layer.gating_kernel.reshape(2, 12)).view(2, 3, 4) + layer.gating_bias
        torch.testing.assert_close(layer.last_gates, torch.softmax(logits, -1))
        torch.testing.assert_close(y, conv_reference(layer, x, cfg), rtol=1e-10, atol=1e-10)


def test_pooled_layer_with_input_size_accepts_other_sizes() -> None:
    layer = Conv2dMoE(2, 3, 2, 3, (8, 8), padding="valid", gate_input="pooled", top_k=1)
    assert layer.output_size == (6, 6)
    assert layer(torch.randn(2, 2, 8, 8)).shape == (2, 3, 6, 6)
    assert layer(torch.randn(2, 2, 5, 7)).shape == (2, 3, 3, 5)
    with pytest.raises(ValueError, match=r"input \(2, 7\) is too small for kernel_size \(3, 3\)"):
        layer(torch.randn(2, 2, 2, 7))


# ---------------------------------------------------------------------------------------------
# Layouts, formats, batches, transforms
# ---------------------------------------------------------------------------------------------


def test_sparse_dense_kernel_is_expert_major_and_keeps_the_seed_shape() -> None:
    torch.manual_seed(0)
    dense = DenseMoE(6, 4, 5)
    sparse = DenseMoE(6, 4, 5, top_k=2)
    assert sparse.expert_kernel.shape == dense.expert_kernel.shape == (6, 4, 5)
    assert sparse.expert_kernel.stride() == (1, 6, 24)  # each expert's (out, in) contiguous
    sparse.load_state_dict(dense.state_dict())
    torch.testing.assert_close(sparse.expert_kernel, dense.expert_kernel)
    sparse = sparse.double()
    assert sparse.expert_kernel.stride() == (1, 6, 24)
    x = torch.randn(3, 6, dtype=torch.float64)
    sparse(x).sum().backward()
    assert sparse.expert_kernel.grad.stride() == (1, 6, 24)
    torch.optim.Adam(sparse.parameters()).step()
    torch.testing.assert_close(sparse(x), dense_reference(sparse, x, 2, "linear"))


@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
def test_sparse_layers_take_empty_batches(ndim: int) -> None:
    layer, shape = small_layer(ndim, top_k=1)
    y = layer(torch.zeros(0, *shape[1:], dtype=torch.float64))
    assert y.shape[0] == 0
    y.sum().backward()


@pytest.mark.parametrize("backend", ["channels", "kernel_mix"])
def test_sparse_conv_channels_last(backend: str) -> None:
    layer, shape = small_layer(2, top_k=2, expert_backend=backend)
    x = torch.randn(shape, dtype=torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = layer(x_cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize("ndim", [0, 2])
def test_torch_func_transforms_work_and_leave_no_escaped_record(ndim: int) -> None:
    """vmap(jacrev(layer)) on a top-k layer: the same Jacobian as autograd, and afterwards
    routing_stats() / aux_losses() say clearly that there is no record (not functorch's
    'escaped' error); a plain forward brings them back."""
    layer, shape = small_layer(ndim, expert_activation="relu", top_k=2)
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.func.vmap(torch.func.jacrev(layer))(x.unsqueeze(1))
    for i in range(2):
        expected = torch.autograd.functional.jacobian(layer, x[i : i + 1])
        torch.testing.assert_close(jac[i], expected)
    layer = layer.train()
    torch.func.vmap(torch.func.jacrev(layer))(x.unsqueeze(1))
    with pytest.raises(RuntimeError, match=r"torch\.func transform"):
        layer.routing_stats()
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        layer.aux_losses()
    assert layer.last_gates is None
    layer(x)
    assert layer.routing_stats()["load"].sum().item() == pytest.approx(2.0)


@pytest.mark.parametrize("ndim", [0, 2])
def test_vmap_over_stacked_parameters(ndim: int) -> None:
    """An ensemble through torch.func: vmap over stacked weights, the input shared."""
    layer, shape = small_layer(ndim, expert_activation="relu", top_k=2)
    x = torch.randn(shape, dtype=torch.float64)
    stacked = {name: torch.stack([p, 1.1 * p]) for name, p in layer.named_parameters()}

    def run(params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(layer, params, (x,))

    expected = torch.stack([run({n: p[i] for n, p in stacked.items()}) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(run)(stacked), expected)


def test_no_forward_yet_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        DenseMoE(3, 2, 2).routing_stats()


def test_gates_and_aux_losses_are_float32_under_autocast() -> None:
    torch.manual_seed(0)
    layer = DenseMoE(16, 8, 4, expert_activation="relu", top_k=2)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.last_gates.dtype == torch.bfloat16  # the dtype the experts were mixed in
    assert all(v.dtype == torch.float32 for v in layer.aux_losses().values())
    # the selection is the float32 one (bfloat16 logits would tie and flip some choices)
    logits = x @ layer.gating_kernel + layer.gating_bias
    top = logits.topk(2, -1).indices
    counted = torch.zeros(4).index_add_(0, top.reshape(-1), torch.ones(64)) / 32
    torch.testing.assert_close(layer.routing_stats()["load"], counted)


@pytest.mark.slow  # compiling takes 10-30 s on 2 busy CPU cores
def test_torch_compile_top_k_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dMoE(1, 2, 3, 3, None, padding="same", gate_input="pooled", top_k=2,
                  expert_activation="relu"),
        nn.Flatten(),
        DenseMoE(72, 3, 4, expert_activation="relu", top_k=1, noisy_gating=True),
    ).eval()  # fmt: skip
    x = torch.randn(4, 1, 6, 6)
    expected = model(x)
    # a fresh dynamo cache: another test's compile of the same layer code with other shapes
    # would make this one dynamic-shaped (which inductor cannot lower for these layers yet)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    assert model[0].last_gates.shape == (4, 2, 3)
    assert set(model[2].aux_losses()) == {"importance", "load", "switch", "z_loss"}
