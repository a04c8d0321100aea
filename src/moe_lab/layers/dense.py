"""Dense mixture of experts (the seed's ``DenseMoE``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import MoEBase, check_positive_int


class DenseMoE(MoEBase):
    r"""Soft mixture of ``n_experts`` dense experts:

    .. math:: y = \sum_k g(v_k^\top x + b_k)\, f(W_k x + c_k)

    Args:
        in_features: size of the last input dimension.
        out_features: size of the last output dimension (the seed's ``units``).
        n_experts: number of experts K.
        **kwargs: the seed's keywords (see :class:`~moe_lab.layers.base.MoEBase`), e.g.
            ``expert_activation="relu"``, ``gating_activation="softmax"``.

    Shape:
        input ``(*, in_features)`` -> output ``(*, out_features)``; any number of leading dims.

    Parameters (the seed's names and layouts):
        ``expert_kernel (in, out, K)``, ``gating_kernel (in, K)``,
        ``expert_bias (out, K)`` or None, ``gating_bias (K,)`` or None.
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, **kwargs: Any) -> None:
        super().__init__(n_experts, **kwargs)
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        k = self.n_experts
        self.expert_kernel = nn.Parameter(torch.empty(in_features, out_features, k))
        self.gating_kernel = nn.Parameter(torch.empty(in_features, k))
        self._finish_init(expert_bias_shape=(out_features, k), gating_bias_shape=(k,))

    def reset_parameters(self) -> None:
        """The seed's init: variance scaling with uniform draws, ``U(-a, a)`` with
        ``a = sqrt(3 * scale / max(1, fan))``; ``fan = (in + out) / 2`` for the experts and
        ``(in + 1) / 2`` for the gate. Biases from their initializers."""
        fan_expert = max(1.0, (self.in_features + self.out_features) / 2)
        fan_gating = max(1.0, (self.in_features + 1) / 2)
        a = math.sqrt(3 * self.expert_kernel_initializer_scale / fan_expert)
        b = math.sqrt(3 * self.gating_kernel_initializer_scale / fan_gating)
        with torch.no_grad():
            self.expert_kernel.uniform_(-a, a)
            self.gating_kernel.uniform_(-b, b)
        self._reset_biases()

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)``."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"DenseMoE expected input of shape (*, {self.in_features}) (last dim = "
                f"in_features), got shape {tuple(x.shape)}"
            )
        self._check_dtype(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        n, k, out = flat.shape[0], self.n_experts, self.out_features

        # All experts as one GEMM: column o*K + k of the (in, out*K) kernel is expert k, unit o.
        expert_kernel = self.expert_kernel.reshape(self.in_features, out * k)
        hidden = _affine(flat, expert_kernel, self.expert_bias)
        hidden = self.expert_activation(hidden.view(n, out, k), -1)  # (N, out, K)
        logits = _affine(flat, self.gating_kernel, self.gating_bias)
        gates = self._gate(logits.view(n, 1, k))  # (N, 1, K)
        # Broadcast multiply + sum over experts: on CPU about 2x faster (forward + backward) than
        # a bmm over N tiny (out, K) @ (K, 1) products.
        y = (hidden * gates.to(hidden.dtype)).sum(-1).view(*lead, out)
        self._record_activity(y)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self._moe_repr()}"
        )


def _affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight + bias`` as one fused GEMM; ``weight`` is ``(in, out)``, ``bias`` any shape
    with ``out`` elements."""
    if bias is None:
        return x @ weight
    return torch.addmm(bias.reshape(-1), x, weight)
