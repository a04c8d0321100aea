"""The benchmark's peers compute the same function as the moe_lab layer they are timed against
(weights copied across), so the speed comparison is like for like."""

import pytest
import torch

from moe_lab.bench.peers import LoopMoE, NaiveOriginalConvMoE, TimmCondConv, tie_filter_gates
from moe_lab.layers import Conv1dMoE, Conv2dMoE, DenseMoE


def _randomize(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def _check_same(layer, peer, x):
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1, y2 = layer(x1), peer(x2)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize(
    ("cls", "ndim", "padding", "size"), [(Conv2dMoE, 2, "same", (7, 6)), (Conv1dMoE, 1, "valid", 9)]
)
def test_naive_original_port_matches_conv_moe(cls, ndim, padding, size):
    torch.manual_seed(0)
    layer = _randomize(
        cls(
            3, 4, 2, 3, size, padding=padding, expert_activation="relu", gating_activation="softmax"
        )
    )
    peer = NaiveOriginalConvMoE(3, 4, 2, 3, size, padding=padding, ndim=ndim).copy_from(layer)
    shape = (5, 3, *((size,) if isinstance(size, int) else size))
    _check_same(layer, peer, torch.randn(shape, dtype=torch.float64).float())


@pytest.mark.parametrize("top_k", [1, 2])
def test_loop_moe_matches_sparse_dense_moe(top_k):
    torch.manual_seed(1)
    layer = _randomize(DenseMoE(6, 5, 4, top_k=top_k))
    peer = LoopMoE(6, 5, 4, top_k).copy_from(layer)
    _check_same(layer, peer, torch.randn(2, 11, 6))
    # the parameter gradients agree too (router and the used experts)
    grads = [
        torch.zeros_like(e.weight) if e.weight.grad is None else e.weight.grad for e in peer.experts
    ]
    kernel_grad = torch.stack([g.t() for g in grads], -1)
    torch.testing.assert_close(layer.expert_kernel.grad, kernel_grad)
    torch.testing.assert_close(layer.gating_kernel.grad, peer.router.weight.grad.t())


@pytest.mark.parametrize("top_k", [1, 2])
def test_loop_moe_with_capacity_matches_the_capacity_layer(top_k):
    torch.manual_seed(3)
    layer = _randomize(DenseMoE(6, 5, 4, top_k=top_k, capacity_factor=0.75))
    with torch.no_grad():  # a skewed router: expert 0 is over-full, so rows are dropped
        layer.gating_bias[0] += 2.0
    peer = LoopMoE(6, 5, 4, top_k, capacity_factor=0.75).copy_from(layer)
    x = torch.randn(13, 6)
    _check_same(layer, peer, x)
    assert layer.routing_stats()["dropped"] > 0.2
    # without the limit the peer computes something else: the capacity is what is compared
    free = LoopMoE(6, 5, 4, top_k).copy_from(layer)
    assert not torch.allclose(free(x), layer(x))


@pytest.mark.parametrize("n_experts", [1, 3])
def test_timm_condconv_matches_kernel_mix(n_experts):
    pytest.importorskip("timm")
    torch.manual_seed(2)
    layer = Conv2dMoE(
        3,
        4,
        n_experts,
        3,
        (6, 6),
        padding=1,
        gate_input="pooled",
        expert_backend="kernel_mix",
        gating_activation="sigmoid",
    )
    tie_filter_gates(_randomize(layer))
    peer = TimmCondConv(3, 4, 3, n_experts, padding=1).copy_from(layer)
    _check_same(layer, peer, torch.randn(4, 3, 6, 6))


@pytest.mark.parametrize(
    ("routing", "hidden", "temperature"), [("sigmoid", None, 1.0), ("softmax", 5, 3.0)]
)
def test_timm_condconv_matches_one_gate_group(routing, hidden, temperature):
    """CondConv's layer (``gate_groups=1``, sigmoid) and DynamicConv's (an MLP gate, softmax
    over logits / tau) against timm's CondConv2d with the same router: no tying needed."""
    pytest.importorskip("timm")
    torch.manual_seed(4)
    layer = Conv2dMoE(3, 4, 3, 3, (6, 6), padding=1, gate_input="pooled", gate_groups=1,
                      expert_backend="kernel_mix", gating_activation=routing, gate_hidden=hidden,
                      gate_temperature=temperature)  # fmt: skip
    _randomize(layer)
    peer = TimmCondConv(3, 4, 3, 3, padding=1, router_hidden=hidden, routing=routing,
                        temperature=temperature).copy_from(layer)  # fmt: skip
    _check_same(layer, peer, torch.randn(4, 3, 6, 6))


def test_timm_condconv_without_timm_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name.startswith("timm"):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ImportError, match="pip install timm"):
        TimmCondConv(3, 4, 3, 2)
