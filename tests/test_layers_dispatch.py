"""The experts' dispatch: the dense layer's top-k backward reuses one gradient buffer across steps
(no fresh large allocation per step) and must never overwrite a gradient someone still holds; the
conv layers' fused epilogue equals loops over its formula and autograd's composition."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE, conv, dispatch


def _layer() -> DenseMoE:
    torch.manual_seed(0)
    return DenseMoE(6, 5, 4, top_k=1).double()


def _grad(layer: DenseMoE, x: torch.Tensor) -> torch.Tensor:
    """The expert kernel's gradient of ``sum(layer(x) * w)``, written out from the gates."""
    with torch.no_grad():
        layer(x)
    gates = layer.last_gates.squeeze(1)  # (N, K), 0 for the experts not kept
    # y = sum_k g_k (x W_k + c_k): dL/dW_k = x^T (g_k * w)
    w = torch.arange(5, dtype=torch.float64) + 1
    return torch.einsum("ni,nk,o->iok", x, gates, w)


def test_reused_buffer_keeps_gradient_semantics() -> None:
    layer = _layer()
    x1, x2 = torch.randn(7, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    w = torch.arange(5, dtype=torch.float64) + 1
    g1, g2 = _grad(layer, x1), _grad(layer, x2)

    (layer(x1) * w).sum().backward()
    torch.testing.assert_close(layer.expert_kernel.grad, g1)
    held = layer.expert_kernel.grad  # kept: the next backward accumulates, never overwrites it
    (layer(x2) * w).sum().backward()
    torch.testing.assert_close(layer.expert_kernel.grad, g1 + g2)
    assert layer.expert_kernel.grad is held

    stash = layer.expert_kernel.grad.clone()
    kept = layer.expert_kernel.grad
    layer.expert_kernel.grad = None  # set_to_none, but a reference survives elsewhere
    (layer(x2) * w).sum().backward()
    torch.testing.assert_close(kept, stash)  # the survivor was not reused
    torch.testing.assert_close(layer.expert_kernel.grad, g2)

    del kept
    layer.expert_kernel.grad = None
    (layer(x1) * w).sum().backward()  # now the buffer is free again: reused, and right
    torch.testing.assert_close(layer.expert_kernel.grad, g1)
    (grad,) = torch.autograd.grad((layer(x2) * w).sum(), [layer.expert_kernel])
    torch.testing.assert_close(grad, g2)
    torch.testing.assert_close(layer.expert_kernel.grad, g1)  # untouched by autograd.grad


def test_gradient_buffer_is_reused_when_free_and_not_copied() -> None:
    layer = _layer()
    x = torch.randn(8, 6, dtype=torch.float64)
    layer(x).sum().backward()
    first = layer.expert_kernel.grad.data_ptr()
    layer.expert_kernel.grad = None
    layer(x).sum().backward()
    assert layer.expert_kernel.grad.data_ptr() == first
    assert layer.expert_kernel.grad.stride() == layer.expert_kernel.stride()


def test_copies_do_not_share_the_buffer() -> None:
    layer = _layer()
    x = torch.randn(8, 6, dtype=torch.float64)
    layer(x).sum().backward()
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        other.zero_grad(set_to_none=True)
        other(x).sum().backward()
        assert other.expert_kernel.grad.data_ptr() != layer.expert_kernel.grad.data_ptr()
        torch.testing.assert_close(other.expert_kernel.grad, layer.expert_kernel.grad)


# ---------------------------------------------------------------------------------------------
# The conv layers' fused epilogue (activation + gate-weighted sum) against loops and gradcheck
# ---------------------------------------------------------------------------------------------


def _loop_mix(hidden: torch.Tensor, gates: torch.Tensor, relu: bool) -> torch.Tensor:
    """``y[b, f] = sum_k gates[b, f, k] * act(hidden[b, f*K + k])`` by explicit loops."""
    batch, groups, k = gates.shape
    out = []
    for b in range(batch):
        rows = []
        for f in range(groups):
            acc = torch.zeros_like(hidden[b, 0])
            for e in range(k):
                h = hidden[b, f * k + e]
                acc = acc + gates[b, f, e] * (h.clamp_min(0) if relu else h)
            rows.append(acc)
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("spatial", [(5,), (3, 4), (2, 3, 2)])
def test_activate_and_mix_matches_loops_and_gradcheck(relu: bool, spatial: tuple) -> None:
    gen = torch.Generator().manual_seed(len(spatial))
    hidden = torch.randn(3, 4 * 2, *spatial, generator=gen, dtype=torch.float64)
    gates = torch.rand(3, 4, 2, generator=gen, dtype=torch.float64)
    hidden.requires_grad_(True)
    gates.requires_grad_(True)

    def fused(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return dispatch.activate_and_mix(h.clone(), g, relu)  # clone: relu works in place

    y = fused(hidden, gates)
    torch.testing.assert_close(y, _loop_mix(hidden, gates, relu))
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gh, gg = torch.autograd.grad((y * w).sum(), [hidden, gates])
    rh, rg = torch.autograd.grad((_loop_mix(hidden, gates, relu) * w).sum(), [hidden, gates])
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gg, rg)
    assert torch.autograd.gradcheck(fused, (hidden, gates))


def _in_graph(t: torch.Tensor, name: str) -> bool:
    """Whether a backward node whose class name contains ``name`` produced ``t``."""
    todo, seen = [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            return True
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return False


@pytest.mark.parametrize("cls", [Conv1dMoE, Conv2dMoE, Conv3dMoE])
@pytest.mark.parametrize("act", ["relu", None])
def test_conv_layer_epilogue_matches_the_autograd_composition(cls, act, monkeypatch) -> None:
    """The fused path and autograd's composition (which the layer keeps inside torch.func
    transforms and for small outputs) give the same gradients."""
    monkeypatch.setattr(conv, "FUSED_EPILOGUE_MIN_ELEMENTS", 0)  # fused at this small size too
    torch.manual_seed(3)
    size = (6,) * cls.ndim
    layer = cls(3, 4, 2, 3, size, padding="same", expert_activation=act,
                gating_activation="softmax", expert_backend="channels").double()  # fmt: skip
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert _in_graph(y, "ActivateAndMix")  # (auto would pick kernel_mix for linear experts)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    params = dict(layer.named_parameters())

    def composed(inp: torch.Tensor, p: dict) -> torch.Tensor:
        return torch.func.functional_call(layer, p, (inp,)).square().sum()

    ref = torch.func.grad(composed, argnums=(0, 1))(
        x.detach(), {n: v.detach() for n, v in params.items()}
    )
    torch.testing.assert_close(grads[0], ref[0])
    for g, name in zip(grads[1:], params, strict=True):
        torch.testing.assert_close(g, ref[1][name])


@pytest.mark.parametrize("shape", [(3, 4, 2, 5), (1, 1, 1, 1), (5, 2, 3, 7), (4, 1, 3, 6)])
def test_mix_all_kernels_matches_loops_and_gradcheck(shape: tuple) -> None:
    """CondConv's kernel mix (strided batched GEMMs) against loops over its formula,
    ``mixed[b, f] = sum_k gates[b, f, k] * kernels[f, k]``, and autograd's numerical gradient."""
    batch, groups, k, width = shape
    torch.manual_seed(0)
    gates = torch.randn(batch, groups, k, dtype=torch.float64, requires_grad=True)
    kernels = torch.randn(groups, k, width, dtype=torch.float64, requires_grad=True)
    want = torch.zeros(batch, groups, width, dtype=torch.float64)
    for b in range(batch):
        for f in range(groups):
            for e in range(k):
                want[b, f] += gates[b, f, e].detach() * kernels[f, e].detach()
    for buffer in (None, dispatch.ReusableBuffer()):
        mixed = dispatch._MixAllKernels.apply(gates, kernels, buffer)
        assert mixed.shape == (batch, groups, width) and mixed.is_contiguous()
        torch.testing.assert_close(mixed.detach(), want, rtol=1e-12, atol=1e-12)
        del mixed
        assert torch.autograd.gradcheck(
            lambda g, w, buf=buffer: dispatch._MixAllKernels.apply(g, w, buf), (gates, kernels)
        )
    # a non-contiguous upstream gradient and non-contiguous gates
    strided = torch.randn(groups, batch, k, dtype=torch.float64).transpose(0, 1).requires_grad_()
    out = dispatch._MixAllKernels.apply(strided, kernels, None)
    upstream = torch.randn(width, groups, batch, dtype=torch.float64).permute(2, 1, 0)
    got = torch.autograd.grad(out, (strided, kernels), upstream)
    ref = torch.autograd.grad(
        torch.einsum("bfk,fkw->bfw", strided, kernels), (strided, kernels), upstream
    )
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_condconv_reuses_its_kernel_buffer_only_once_free() -> None:
    """The per-sample kernels live in one buffer across steps; a second call while the first
    call's graph still holds them must not overwrite them (gradients as the channels backend,
    which computes every expert and never mixes kernels)."""
    torch.manual_seed(0)
    mixing = Conv2dMoE(3, 4, 2, 3, (6, 6), padding="same", gate_input="pooled",
                       expert_backend="kernel_mix").double()  # fmt: skip
    channels = Conv2dMoE(3, 4, 2, 3, (6, 6), padding="same", gate_input="pooled",
                         expert_backend="channels").double()  # fmt: skip
    channels.load_state_dict(mixing.state_dict())
    x1, x2 = torch.randn(2, 2, 3, 6, 6, dtype=torch.float64).unbind(0)
    w1, w2 = torch.randn(2, 2, 4, 6, 6, dtype=torch.float64).unbind(0)

    def grads(layer: Conv2dMoE) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        y1 = layer(x1)  # its kernels are saved for the backward below...
        y2 = layer(x2)  # ...so this call must take fresh memory for its own
        ((y1 * w1).sum() + (y2 * w2).sum()).backward()
        return [p.grad.clone() for p in layer.parameters()]

    for got, want in zip(grads(mixing), grads(channels), strict=True):
        torch.testing.assert_close(got, want)
    kept = mixing._mixed_kernels._buffer.data_ptr()
    for _ in range(2):  # each backward frees the kernels: the next step reuses their memory
        mixing.zero_grad(set_to_none=True)
        (mixing(x1) * w1).sum().backward()
        assert mixing._mixed_kernels._buffer.data_ptr() == kept


def test_small_conv_outputs_take_the_composition_and_large_ones_the_fused_epilogue() -> None:
    torch.manual_seed(0)
    layer = Conv1dMoE(1, 4, 2, 3, (8,), padding="same", expert_activation="relu",
                      gating_activation="softmax")  # fmt: skip
    small = layer(torch.randn(2, 1, 8))  # 2 * 8 * 8 elements before the mix
    assert not _in_graph(small, "ActivateAndMix")
    big = Conv1dMoE(1, 4, 2, 3, (2**12,), padding="same", expert_activation="relu",
                    gating_activation="softmax")  # fmt: skip
    large = big(torch.randn(8, 1, 2**12))  # 8 * 8 * 4096 = 2**18 elements
    assert _in_graph(large, "ActivateAndMix")
