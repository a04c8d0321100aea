"""The dense layer's top-k backward reuses one gradient buffer across steps (no fresh large
allocation per step): it must never overwrite a gradient someone still holds."""

from __future__ import annotations

import copy
import pickle

import torch

from moe_lab.layers import DenseMoE


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
