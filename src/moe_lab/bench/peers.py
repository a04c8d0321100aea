"""What a user would write (or pick) instead of moe_lab's layers: the peers the benchmark times.

Each peer is a plain torch module computing the same function as one moe_lab layer configuration,
and ``copy_from(layer)`` loads that layer's weights into it, so a side-by-side timing compares
the same arithmetic:

- :class:`NaiveOriginalConvMoE`: a literal torch port of the original Keras ``Conv2DMoE`` ops
  (one convolution with ``out * K`` channels, reshape, + bias, relu, a dense gate from the
  flattened input volume, softmax over K, multiply, sum). Peer of ``Conv{1,2,3}dMoE`` with relu
  experts and softmax full-volume gates.
- :class:`LoopMoE`: the Mixtral-style per-expert loop that users copy (one ``nn.Linear`` per
  expert, a router, softmax / top-k, ``torch.where`` over the one-hot routing mask,
  ``index_add_``). Peer of ``DenseMoE(top_k=k)`` with linear experts; with ``capacity_factor``
  each expert keeps its first C rows in gate order, as the Switch Transformer's loop does (peer of
  ``DenseMoE(top_k=k, capacity_factor=cf)``).
- :class:`TimmCondConv`: timm's ``CondConv2d`` fed by an external router (global average pool,
  ``nn.Linear``, sigmoid, as timm's EfficientNet CondConv blocks do). Peer of
  ``Conv2dMoE(expert_backend="kernel_mix", gate_input="pooled", gating_activation="sigmoid")``
  with linear experts. With ``router_hidden`` and ``routing="softmax"`` its router is
  DynamicConv's (pool, FC, ReLU, FC, softmax over logits / tau): the peer of the ``dynamic_conv``
  preset's layer. Needs timm (``pip install timm``, in the ``dev`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return (value,) * ndim if isinstance(value, int) else tuple(value)


class NaiveOriginalConvMoE(nn.Module):
    """The original's convolutional MoE ops, ported one to one to torch.

    ``(B, in_channels, *input_size) -> (B, out_channels, *S')``: ``h = conv(x) + bias`` with
    ``out * K`` channels viewed as ``(out, K)`` (filter-major), ``relu(h)``, gates
    ``softmax(Linear(flatten(x)))`` over K per filter, then ``sum_k gate * relu(h)``.

    Args:
        in_channels, out_channels: C and the filters F.
        n_experts: experts per filter K.
        kernel_size: int or one per spatial dim.
        input_size: the spatial size (the gate reads the whole volume).
        padding: ``"valid"``, ``"same"`` (stride 1, as ``F.conv2d`` takes it) or ints.
        ndim: spatial dims, 1-3.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_experts: int,
        kernel_size: int | Sequence[int],
        input_size: int | Sequence[int],
        padding: str | int | Sequence[int] = "valid",
        ndim: int = 2,
    ) -> None:
        super().__init__()
        self.ndim, self.out_channels, self.n_experts = ndim, out_channels, n_experts
        self.padding = padding if isinstance(padding, str) else _tuple(padding, ndim)
        ks, size = _tuple(kernel_size, ndim), _tuple(input_size, ndim)
        self.weight = nn.Parameter(torch.empty(out_channels * n_experts, in_channels, *ks))
        self.bias = nn.Parameter(torch.zeros(out_channels, n_experts))
        self.gate = nn.Linear(in_channels * math.prod(size), out_channels * n_experts)
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(in_channels * math.prod(ks)))

    @torch.no_grad()
    def copy_from(self, layer: nn.Module) -> NaiveOriginalConvMoE:
        """Load a moe_lab ``Conv{1,2,3}dMoE``'s weights (same shapes, gate kernel transposed)."""
        self.weight.copy_(layer.expert_kernel)
        self.bias.copy_(layer.expert_bias)
        self.gate.weight.copy_(layer.gating_kernel.reshape(self.gate.in_features, -1).t())
        self.gate.bias.copy_(layer.gating_bias.reshape(-1))
        return self

    def forward(self, x: Tensor) -> Tensor:
        b, out, k = x.shape[0], self.out_channels, self.n_experts
        h = _CONV[self.ndim](x, self.weight, None, 1, self.padding)
        h = h.reshape(b, out, k, *h.shape[2:])
        h = torch.relu(h + self.bias.view(1, out, k, *([1] * self.ndim)))
        gates = torch.softmax(self.gate(x.flatten(1)).view(b, out, k), dim=-1)
        return (h * gates.view(b, out, k, *([1] * self.ndim))).sum(2)


class LoopMoE(nn.Module):
    """The Mixtral-style sparse MoE block: a loop over experts with ``torch.where`` over the
    one-hot routing mask and ``index_add_``.

    ``(*, in_features) -> (*, out_features)``. Router ``logits = Linear(x)``; gates are the
    softmax over all K of the top-1 logit for ``top_k=1`` (Switch) and the softmax over the kept
    logits for ``top_k >= 2`` (Mixtral's renormalised top-k); each expert is an ``nn.Linear``.
    With ``capacity_factor`` cf, expert e takes at most ``C = min(N, ceil(cf N k / K))`` of its
    rows, highest gate first (equal gates in row, then slot order); the rest are dropped.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(in_features, n_experts)
        self.experts = nn.ModuleList(nn.Linear(in_features, out_features) for _ in range(n_experts))

    @torch.no_grad()
    def copy_from(self, layer: nn.Module) -> LoopMoE:
        """Load a moe_lab ``DenseMoE``'s weights: expert k is ``expert_kernel[:, :, k]``."""
        self.router.weight.copy_(layer.gating_kernel.t())
        self.router.bias.copy_(layer.gating_bias)
        for k, expert in enumerate(self.experts):
            expert.weight.copy_(layer.expert_kernel[:, :, k].t())
            expert.bias.copy_(layer.expert_bias[:, k])
        return self

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        hidden = x.reshape(-1, self.in_features)
        probs = torch.softmax(self.router(hidden), dim=-1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(hidden.dtype)
        out = hidden.new_zeros(hidden.shape[0], self.out_features)
        mask = F.one_hot(selected, self.n_experts).permute(2, 1, 0)  # (K, k, N)
        n = hidden.shape[0]
        capacity = None
        if self.capacity_factor is not None:
            capacity = min(n, math.ceil(self.capacity_factor * n * self.top_k / self.n_experts))
        for e, expert in enumerate(self.experts):
            slot, rows = torch.where(mask[e])
            if rows.numel() == 0:
                continue
            if capacity is not None and rows.numel() > capacity:
                by_row = torch.argsort(rows * self.top_k + slot)  # row, then slot order
                slot, rows = slot[by_row], rows[by_row]
                first = torch.sort(weights[rows, slot], descending=True, stable=True).indices
                slot, rows = slot[first[:capacity]], rows[first[:capacity]]
            y = expert(hidden[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y)
        return out.view(*lead, self.out_features)


class TimmCondConv(nn.Module):
    """timm's ``CondConv2d`` with the router timm's EfficientNet CondConv blocks use:
    ``routing = sigmoid(Linear(global_avg_pool(x)))`` (one weight per expert, shared by all
    filters), then the per-sample mixed kernel as one grouped convolution.

    ``(B, in_channels, H, W) -> (B, out_channels, H', W')``.

    Args:
        router_hidden: None (CondConv's one ``Linear``), or H: DynamicConv's router, ``Linear(C,
            H)``, ReLU, ``Linear(H, K)``.
        routing: ``"sigmoid"`` (CondConv) or ``"softmax"`` over the experts (DynamicConv).
        temperature: the logits are divided by it before ``routing`` (DynamicConv's tau).

    Raises:
        ImportError: timm is not installed (``pip install timm``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        n_experts: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        router_hidden: int | None = None,
        routing: str = "sigmoid",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        try:
            from timm.layers import CondConv2d
        except ImportError as err:
            raise ImportError(
                "TimmCondConv needs timm: pip install timm (or pip install 'moe_lab[dev]')"
            ) from err
        if routing not in ("sigmoid", "softmax"):
            raise ValueError(f"routing must be 'sigmoid' or 'softmax', got {routing!r}")
        self.n_experts, self.routing, self.temperature = n_experts, routing, temperature
        if router_hidden is None:
            self.router: nn.Module = nn.Linear(in_channels, n_experts)
        else:
            self.router = nn.Sequential(
                nn.Linear(in_channels, router_hidden),
                nn.ReLU(),
                nn.Linear(router_hidden, n_experts),
            )
        self.conv = CondConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=bias,
            num_experts=n_experts,
        )

    @torch.no_grad()
    def copy_from(self, layer: nn.Module) -> TimmCondConv:
        """Load a moe_lab ``Conv2dMoE(gate_input="pooled")``'s weights. timm's router is shared
        by all filters, so the first gate group's gate is taken (the layer has ``gate_groups=1``,
        or ties its filters' gates, see :func:`tie_filter_gates`); expert k of filter f is
        ``expert_kernel[f * K + k]``."""
        k, out = self.n_experts, self.conv.out_channels
        last = self.router if isinstance(self.router, nn.Linear) else self.router[2]
        if isinstance(self.router, nn.Sequential):
            self.router[0].weight.copy_(layer.gating_hidden_kernel.t())
            self.router[0].bias.copy_(layer.gating_hidden_bias)
        last.weight.copy_(layer.gating_kernel[:, 0, :].t())
        last.bias.copy_(layer.gating_bias[0])
        kernel = layer.expert_kernel.reshape(out, k, -1).transpose(0, 1)  # (K, out, C*kh*kw)
        self.conv.weight.copy_(kernel.reshape(k, -1))
        if self.conv.bias is not None:
            self.conv.bias.copy_(layer.expert_bias.t())
        return self

    def forward(self, x: Tensor) -> Tensor:
        logits = self.router(x.mean((2, 3))) / self.temperature
        routing = torch.sigmoid(logits) if self.routing == "sigmoid" else logits.softmax(-1)
        return self.conv(x, routing)


@torch.no_grad()
def tie_filter_gates(layer: nn.Module) -> nn.Module:
    """Give every filter of a pooled-gate conv MoE layer filter 0's gate (timm's CondConv routes
    all filters with one gate), so that it computes :class:`TimmCondConv`'s function."""
    layer.gating_kernel.copy_(layer.gating_kernel[:, :1].clone().expand_as(layer.gating_kernel))
    if layer.gating_bias is not None:
        layer.gating_bias.copy_(layer.gating_bias[:1].clone().expand_as(layer.gating_bias))
    return layer
