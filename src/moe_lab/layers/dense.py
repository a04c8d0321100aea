"""Dense mixture of experts (the original's ``DenseMoE``), dense or top-k routed."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import capacity, dispatch, routing
from .base import MoEBase, MoEOptions, check_positive_int
from .keywords import rejects_original_keywords, takes_keywords_of
from .precision import check_input_dtype, mix_dtype

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; only type checkers read it


class DenseMoE(MoEBase):
    r"""Mixture of ``n_experts`` dense experts:

    .. math:: y = \sum_k g(v_k^\top x + b_k)\, f(W_k x + c_k)

    By default (``top_k=None``) every expert is computed and mixed (the original's soft mixture).
    With ``top_k=k < n_experts`` each row keeps its k largest gate logits and only those experts
    are computed: the rows are sorted by expert and each expert multiplies its contiguous slice
    (one GEMM per expert; see :func:`~moe_lab.layers.dispatch.grouped_linear`), so the experts'
    work is ``N * k * in * out`` whatever K is.

    Args:
        in_features: size of the last input dimension.
        out_features: size of the last output dimension (the original's ``units``).
        n_experts: number of experts K.
        expert_activation, gating_activation, ...: the original's keywords, the routing ones
            (``top_k``, ``noisy_gating``, ``gate_input``, ``expert_backend``) and ``device`` /
            ``dtype``; all keyword-only, described in :class:`~moe_lab.layers.base.MoEBase`.

    Shape:
        input ``(*, in_features)`` -> output ``(*, out_features)``; any number of leading dims.

    Parameters (the original's names and layouts):
        ``expert_kernel (in, out, K)``, ``gating_kernel (in, K)``,
        ``expert_bias (out, K)`` or None, ``gating_bias (K,)`` or None; with ``noisy_gating``
        also ``noise_kernel (in, K)``. With ``top_k < n_experts`` the expert kernel keeps its
        shape but is stored expert-major (strides ``(1, in, in * out)``: each expert's matrix is
        a contiguous ``(out, in)`` block, ``nn.Linear``'s weight layout), so dispatch reads it
        without a copy and its gradient is written in place; values, state dicts and optimizers
        are unaffected. Why ``(out, in)`` and not ``(in, out)``: with few rows per expert the
        GEMMs are bound by reading the weight, and BLAS reads it faster in this orientation
        (measured at 2 rows, 2304 -> 512: forward 0.72 ms vs 1.26 ms, input gradient 0.59 vs
        1.20, weight gradient 1.13 vs 1.70 per expert).
        With ``gate_hidden`` H: ``gating_hidden_kernel (in, H)``, ``gating_hidden_bias (H,)``
        and ``gating_kernel (H, K)``; with ``n_shared_experts`` S: ``shared_expert_kernel
        (in, out, S)`` and ``shared_expert_bias (out, S)``; with ``balance``: the buffer
        ``balance_bias (1, K)``.
    """

    @rejects_original_keywords
    @takes_keywords_of(MoEBase)
    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_experts: int,
        **options: Unpack[MoEOptions],
    ) -> None:
        super().__init__(n_experts, **options)
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        if self.gate_groups not in (None, 1):
            raise ValueError(
                f"DenseMoE has one gate per row: gate_groups must be None or 1, got "
                f"{self.gate_groups!r} (gate groups share gates among a conv layer's filters)"
            )
        k = self.n_experts
        if self.is_sparse:
            kernel = torch.empty(k, out_features, in_features, **self._factory).permute(2, 1, 0)
        else:
            kernel = torch.empty(in_features, out_features, k, **self._factory)
        self.expert_kernel = nn.Parameter(kernel)
        self._make_gate((in_features,), (k,))
        self._finish_init(
            expert_bias_shape=(out_features, k),
            gating_bias_shape=(k,),
            shared_kernel_shape=(in_features, out_features, self.n_shared_experts),
        )
        # top-k's backward writes all K experts' kernel gradient: reuse its storage across steps
        self._grad_buffer = dispatch.ReusableBuffer() if self.is_sparse else None

    def reset_parameters(self) -> None:
        """The original's init: variance scaling with uniform draws, ``U(-a, a)`` with
        ``a = sqrt(3 * scale / max(1, fan))``; ``fan = (in + out) / 2`` for the experts and
        ``(in + 1) / 2`` for the gate. Biases from their initializers; the noise kernel zero.

        The shared experts are drawn as the routed ones. With ``gate_hidden`` H the gate's
        output layer reads H features (``fan = (H + 1) / 2``) and its hidden layer is He-uniform
        for its ReLU, ``U(-h, h)``, ``h = sqrt(6 / in)``, which keeps the hidden features' scale
        near the input's, so the logits start as large as without the hidden layer."""
        gate_in = self.in_features if self.gate_hidden is None else self.gate_hidden
        fan_expert = max(1.0, (self.in_features + self.out_features) / 2)
        fan_gating = max(1.0, (gate_in + 1) / 2)
        a = math.sqrt(3 * self.expert_kernel_initializer_scale / fan_expert)
        b = math.sqrt(3 * self.gating_kernel_initializer_scale / fan_gating)
        with torch.no_grad():
            self.expert_kernel.uniform_(-a, a)
            self.gating_kernel.uniform_(-b, b)
            if self.shared_expert_kernel is not None:
                self.shared_expert_kernel.uniform_(-a, a)
            if self.gating_hidden_kernel is not None:
                h = math.sqrt(6 / self.in_features)
                self.gating_hidden_kernel.uniform_(-h, h)
        self._reset_biases()

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)``."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"DenseMoE expected input of shape (*, {self.in_features}) (last dim = "
                f"in_features), got shape {tuple(x.shape)}"
            )
        check_input_dtype(type(self).__name__, x, self.expert_kernel)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        gates, index, positions = self._route(flat, mix_dtype(x, self.expert_kernel))  # (N, 1, k)
        if index is None:
            y = self._mix_all(flat, gates)
        elif flat.shape[0] == 0 or routing.in_functorch_transform(flat, gates, self.expert_kernel):
            # Inside torch.func transforms data-dependent sizes cannot be vmapped: compute every
            # expert and zero the gates of those not kept (the same values, K-fold work).
            y = self._mix_all(flat, routing.dense_gates(gates, index, self.n_experts))
        elif positions is not None:
            y = self._mix_capacity(flat, gates.view(-1, index.shape[-1]), index, positions)
        else:
            y = self._mix_kept(flat, gates.view(-1), index.view(-1))
        if self.shared_expert_kernel is not None:
            y = y + self._shared(flat)
        y = y.view(*lead, self.out_features)
        self._record_activity(y)
        return y

    def _mix_all(self, flat: Tensor, gates: Tensor) -> Tensor:
        """Every expert, weighted by ``gates (N, 1, K)``: ``(N, in) -> (N, out)``."""
        n, k, out = flat.shape[0], self.n_experts, self.out_features
        # All experts as one GEMM: column o*K + k of the (in, out*K) kernel is expert k, unit o.
        expert_kernel = self.expert_kernel.reshape(self.in_features, out * k)
        hidden = _affine(flat, expert_kernel, self.expert_bias)
        hidden = self.expert_activation(hidden.view(n, out, k), -1)  # (N, out, K)
        # Broadcast multiply + sum over experts: on CPU about 2x faster (forward + backward) than
        # a bmm over N tiny (out, K) @ (K, 1) products.
        return (hidden * gates.to(hidden.dtype)).sum(-1)

    def _mix_kept(self, flat: Tensor, gates: Tensor, index: Tensor) -> Tensor:
        """Only the kept experts: ``flat (N, in)``, ``gates`` and ``index`` ``(N * k,)`` (row
        i's j-th kept expert at ``i * k + j``) -> ``(N, out)``."""
        k = self.top_k
        assert k is not None
        # Sort the N*k (row, expert) assignments by expert: each expert's rows become one
        # contiguous slice, multiplied by that expert's matrix in one GEMM.
        order = torch.argsort(index, stable=True)
        rows = torch.div(order, k, rounding_mode="floor")  # input row of each sorted assignment
        counts = torch.bincount(index, minlength=self.n_experts).tolist()  # host ints
        weight = self.expert_kernel.permute(2, 1, 0)  # (K, out, in), contiguous when sparse
        bias = None if self.expert_bias is None else self.expert_bias.t()  # (K, out)
        buffer = self._grad_buffer if weight.is_contiguous() else None
        hidden = dispatch.grouped_linear(flat.index_select(0, rows), weight, bias, counts, buffer)
        hidden = self.expert_activation(hidden, -1)  # (N*k, out), elementwise
        hidden = hidden * gates.index_select(0, order).unsqueeze(-1).to(hidden.dtype)
        if k == 1:  # rows is a permutation: every output row is written once
            return hidden.new_empty(flat.shape[0], self.out_features).index_copy(0, rows, hidden)
        y = hidden.new_zeros(flat.shape[0], self.out_features)
        return y.index_add(0, rows, hidden)

    def _mix_capacity(
        self, flat: Tensor, gates: Tensor, index: Tensor, positions: Tensor
    ) -> Tensor:
        """Top-k with ``capacity_factor``: ``gates (N, k)`` (0 where dropped), ``index`` and
        ``positions`` ``(N, 1, k)`` -> ``(N, out)``. Static shapes: every expert runs on a
        ``(capacity, in)`` block (see :func:`~moe_lab.layers.capacity.capacity_dense`)."""
        n, k = gates.shape
        assert self.capacity_factor is not None
        size = capacity.expert_capacity(n, k, self.n_experts, self.capacity_factor)
        weight = self.expert_kernel.permute(2, 1, 0)  # (K, out, in), contiguous when sparse
        bias = None if self.expert_bias is None else self.expert_bias.t()  # (K, out)
        act = self.expert_activation
        hidden = capacity.capacity_dense(
            flat, weight, bias, index.view(n, k), positions.view(n, k), size, lambda h: act(h, -1)
        )  # (N, k, out), elementwise activation
        return (hidden * gates.to(hidden.dtype).unsqueeze(-1)).sum(1)

    def _shared(self, flat: Tensor) -> Tensor:
        """The shared experts, ``(N, in) -> (N, out)``: ``sum_s f(flat @ W_s + c_s)``."""
        n, shared = flat.shape[0], self.n_shared_experts
        kernel = self.shared_expert_kernel.reshape(self.in_features, -1)  # column o*S + s
        hidden = _affine(flat, kernel, self.shared_expert_bias)
        return self.expert_activation(hidden.view(n, self.out_features, shared), -1).sum(-1)

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
