"""Routing for the MoE layers: top-k selection, the record of the last forward, the auxiliary
(load-balancing) losses, expert-usage statistics, and the grouped matmul that dispatches rows to
their experts. Imports torch only.

Shapes: ``N`` samples, ``G`` gate groups (1 for the dense layer, ``out_channels`` for the conv
layers: every filter routes on its own), ``K`` experts per group, ``k`` experts kept per
(sample, group) pair.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Names of the auxiliary losses returned by ``layer.aux_losses()`` (and the keys of
#: ``experts.aux_loss_weights`` in the configs).
AUX_LOSS_NAMES: tuple[str, ...] = ("importance", "load", "switch", "z_loss")
GATE_INPUTS: tuple[str, ...] = ("full", "pooled")
EXPERT_BACKENDS: tuple[str, ...] = ("auto", "channels", "kernel_mix")

#: Added to the learned noise std (Shazeer et al. 2017 use the same 1e-2): the smooth load
#: estimator divides by the std, which must stay away from zero.
NOISE_EPSILON = 1e-2
_CV_EPSILON = 1e-10  # cv^2 = var / (mean^2 + eps): zero, not NaN, when nothing was routed


class RoutingRecord(NamedTuple):
    """What one forward routed, kept on the layer for ``aux_losses()`` and ``routing_stats()``.

    Tensors are in the gate dtype (float32, or float64 for float64 layers) and keep their graph,
    so the auxiliary losses are differentiable. Recording stores references only: nothing is
    computed for it in the forward.
    """

    logits: Tensor  # (N, G, K) clean gate logits
    routed_logits: Tensor  # (N, G, K) the logits selection used: logits + noise, or logits
    noise_std: Tensor | None  # (N, G, K) std of the noise that was added; None when none was
    gates: Tensor  # (N, G, k) gates of the kept experts; k = K for a dense mixture
    index: Tensor | None  # (N, G, k) the kept experts; None when every expert is kept, in order
    top_k: int | None  # the layer's top_k (None: dense mixture)
    gates_dtype: torch.dtype  # dtype the experts' outputs were mixed in (``last_gates``' dtype)


def in_functorch_transform(*tensors: Tensor) -> bool:
    """True when any of ``tensors`` is wrapped by a ``torch.func`` transform (vmap, grad,
    jacrev, ...; the input, or the parameters under ``functional_call``).

    Tensors seen inside a transform must not outlive it: kept on the layer they make later reads
    fail with functorch's "escaped" error, and their data-dependent sizes cannot be vmapped.
    Under ``torch.compile`` the check is skipped (dynamo cannot trace it, and compiled code runs
    outside transforms).
    """
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def select_top_k(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Keep the ``top_k`` largest logits of each row: ``(*, K) -> gates (*, k), index (*, k)``.

    - ``top_k >= 2``: the gates are the softmax over the kept logits (Shazeer et al. 2017); the
      softmax runs after the selection, so the gates sum to 1 and depend on every kept logit.
    - ``top_k == 1``: a softmax over one kept logit is the constant 1, which gives the router no
      gradient from the task loss. The gate is instead the chosen expert's probability under the
      softmax over all K logits (Switch Transformer, Fedus et al. 2021), which does.
    """
    kept, index = logits.topk(top_k, dim=-1)
    if top_k == 1:
        return torch.softmax(logits, dim=-1).gather(-1, index), index
    return torch.softmax(kept, dim=-1), index


def dense_gates(gates: Tensor, index: Tensor | None, n_experts: int) -> Tensor:
    """Kept gates ``(*, k)`` scattered to ``(*, K)``, zero for experts not kept."""
    if index is None:
        return gates
    return gates.new_zeros(*gates.shape[:-1], n_experts).scatter(-1, index, gates)


def _assignments(record: RoutingRecord) -> Tensor | None:
    """The experts each (sample, group) pair is counted as routed to, ``(N, G, k)``: the kept
    experts for top-k, the largest gate for a dense mixture, None when every expert is kept."""
    if record.index is not None:
        return record.index
    if record.top_k is None:
        return record.gates.argmax(-1, keepdim=True)
    return None


def _counts(record: RoutingRecord, n_experts: int) -> tuple[Tensor, int]:
    """Assignments per group and expert ``(G, K)`` (no gradient) and assignments per pair."""
    n, groups = record.logits.shape[:2]
    assigned = _assignments(record)
    if assigned is None:  # every expert kept: each gets every pair
        return record.logits.new_full((groups, n_experts), float(n)).detach(), n_experts
    per_group = assigned.detach().transpose(0, 1).reshape(groups, -1)  # (G, N*k)
    ones = torch.ones_like(per_group, dtype=record.logits.dtype)
    counts = record.logits.new_zeros(groups, n_experts).scatter_add_(1, per_group, ones)
    return counts, assigned.shape[-1]


def cv_squared(x: Tensor) -> Tensor:
    """Mean over groups of the squared coefficient of variation over experts: ``x (G, K) -> ()``,
    ``var / (mean^2 + 1e-10)`` with the population variance (Shazeer et al. 2017's ``cv_squared``)."""
    mean = x.mean(-1)
    var = (x - mean.unsqueeze(-1)).square().mean(-1)
    return (var / (mean.square() + _CV_EPSILON)).mean()


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def smooth_load(record: RoutingRecord, k: int) -> Tensor:
    """Shazeer et al. (2017)'s differentiable load ``(G, K)``: the probability, summed over
    samples, that expert i stays among the k largest noisy logits when only its own noise is
    redrawn: ``Phi((clean_i - threshold_i) / std_i)``, where the threshold is the k-th largest
    noisy logit of the other experts (the (k+1)-th largest overall if i is kept, else the k-th)."""
    assert record.noise_std is not None and k < record.logits.shape[-1]
    top = record.routed_logits.topk(k + 1, dim=-1).values  # (N, G, k+1)
    threshold_if_kept = top[..., k : k + 1]
    threshold_if_not = top[..., k - 1 : k]
    kept = record.routed_logits > threshold_if_kept
    threshold = torch.where(kept, threshold_if_kept, threshold_if_not)
    return _normal_cdf((record.logits - threshold) / record.noise_std).sum(0)


def aux_losses(record: RoutingRecord, n_experts: int) -> dict[str, Tensor]:
    """The auxiliary losses of one forward, scalar tensors with their graph (see
    :meth:`~moe_lab.layers.base.MoEBase.aux_losses` for the definitions)."""
    n = record.logits.shape[0]
    gates = dense_gates(record.gates, record.index, n_experts)  # (N, G, K)
    importance = cv_squared(gates.sum(0))
    counts, k = _counts(record, n_experts)
    if record.noise_std is not None and k < n_experts:
        load = cv_squared(smooth_load(record, k))
    else:
        load = cv_squared(counts)
    fraction = counts / max(n * k, 1)  # (G, K), sums to 1 over experts
    mean_prob = torch.softmax(record.routed_logits, dim=-1).sum(0) / max(n, 1)  # (G, K)
    switch = n_experts * (fraction * mean_prob).sum(-1).mean()
    z_loss = torch.logsumexp(record.logits, dim=-1).square().mean()
    return {"importance": importance, "load": load, "switch": switch, "z_loss": z_loss}


@torch.no_grad()
def routing_stats(record: RoutingRecord, n_experts: int) -> dict[str, Tensor]:
    """Per-expert usage of one forward (see :meth:`~moe_lab.layers.base.MoEBase.routing_stats`)."""
    gates = dense_gates(record.gates, record.index, n_experts).detach().float()
    gates = gates.flatten(0, -2)  # (N*G, K)
    pairs = gates.shape[0]
    importance = gates.mean(0)
    assigned = _assignments(record)
    if assigned is None:
        load = torch.ones_like(importance)
    else:
        flat = assigned.reshape(-1)
        load = torch.zeros_like(importance).index_add_(
            0, flat, torch.ones_like(flat, dtype=gates.dtype)
        )
        load = load / pairs
    p = gates.clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    return {"importance": importance, "load": load, "entropy": entropy}


# ---------------------------------------------------------------------------------------------
# Grouped matmul: the dense layer's sparse experts
# ---------------------------------------------------------------------------------------------


class _GroupedLinear(torch.autograd.Function):
    """``rows (M, in)`` sorted by expert, ``weight (K, in, out)``, ``bias (K, out)`` or None,
    ``counts`` rows per expert (host ints) -> ``(M, out)``; each expert's contiguous slice of rows
    times its own matrix.

    A custom Function, not autograd through a loop of ``addmm`` on ``weight.unbind(0)``: the
    backward writes each expert's weight gradient straight into one ``(K, in, out)`` buffer laid
    out like ``weight`` (so it becomes ``.grad`` without a copy), where unbind's backward would
    allocate K slices and then stack them, and the forward writes into one output instead of
    concatenating. On CPU each fresh large buffer costs page faults, which dominate at this size.
    First-order only (no double backward).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        rows: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        counts: list[int],
    ) -> Tensor:
        out = rows.new_empty(rows.shape[0], weight.shape[-1])
        start = 0
        for expert, count in enumerate(counts):
            stop = start + count
            if count and bias is None:
                torch.mm(rows[start:stop], weight[expert], out=out[start:stop])
            elif count:
                torch.addmm(bias[expert], rows[start:stop], weight[expert], out=out[start:stop])
            start = stop
        ctx.save_for_backward(rows, weight)
        ctx.counts = counts
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        rows, weight = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = None
        if ctx.has_bias and need_bias:
            grad_bias = weight.new_zeros(weight.shape[0], weight.shape[-1])
        grad_out = grad_out.contiguous()
        device = grad_out.device.type
        with autocast_off(device):
            _grouped_linear_backward(
                ctx.counts, rows, weight, grad_out, grad_rows, grad_weight, grad_bias
            )
        return grad_rows, grad_weight, grad_bias, None


def _grouped_linear_backward(
    counts: list[int],
    rows: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    grad_rows: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
) -> None:
    """Fill the gradient buffers of :class:`_GroupedLinear` in place."""
    start = 0
    for expert, count in enumerate(counts):
        stop = start + count
        rows_e, grad_e = rows[start:stop], grad_out[start:stop]
        if grad_rows is not None and count:
            torch.mm(grad_e, weight[expert].t(), out=grad_rows[start:stop])
        if grad_weight is not None:
            if count:
                torch.mm(rows_e.t(), grad_e, out=grad_weight[expert])
            else:
                grad_weight[expert].zero_()
        if grad_bias is not None and count:
            torch.sum(grad_e, 0, out=grad_bias[expert])
        start = stop


def autocast_enabled(device: str) -> bool:
    """Whether autocast is on for ``device`` (a device type such as ``"cpu"``; False for device
    types without autocast, such as ``"meta"``)."""
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def autocast_off(device: str) -> contextlib.AbstractContextManager[object]:
    """Autocast disabled for ``device`` when it is on there, else a no-op context."""
    if autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def grouped_linear(rows: Tensor, weight: Tensor, bias: Tensor | None, counts: list[int]) -> Tensor:
    """``(M, in) -> (M, out)``: rows ``[sum(counts[:e]), sum(counts[:e+1]))`` go through expert
    e's ``weight[e] (in, out)`` and ``bias[e] (out,)``. One GEMM per expert on a contiguous slice
    (the loop is over experts, with a Python int count each, never over rows).

    Under autocast the operands are cast to the autocast dtype first (as ``F.linear`` would be),
    and the GEMMs run with autocast off (``out=`` GEMMs do not autocast).
    """
    device = rows.device.type
    if autocast_enabled(device) and weight.dtype != torch.float64:  # as autocast does
        dtype = torch.get_autocast_dtype(device)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with autocast_off(device):  # out= GEMMs do not autocast
        return _GroupedLinear.apply(rows, weight, bias, counts)
