"""Routing for the MoE layers: the router (gate logits, noise, top-k selection), the record of the
last forward, the auxiliary (load-balancing) losses and expert-usage statistics. The experts'
dispatch (grouped matmul, grouped convolution) is in :mod:`moe_lab.layers.dispatch`. Imports
torch only.

Shapes: ``N`` samples, ``G`` gate groups (1 for the dense layer; for the conv layers
``out_channels`` by default, every filter routing on its own, or ``gate_groups``), ``K`` experts
per group, ``k`` experts kept per (sample, group) pair.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: Names of the auxiliary losses returned by ``layer.aux_losses()`` (and the keys of
#: ``experts.aux_loss_weights`` in the configs).
AUX_LOSS_NAMES: tuple[str, ...] = ("importance", "load", "switch", "z_loss")
GATE_INPUTS: tuple[str, ...] = ("full", "pooled")
EXPERT_BACKENDS: tuple[str, ...] = ("auto", "channels", "kernel_mix")

#: Added to the learned noise std (Shazeer et al. 2017 use the same 1e-2): the smooth load
#: estimator divides by the std, which must stay away from zero.
NOISE_EPSILON = 1e-2
_CV_EPSILON = 1e-10
#: ``routing_stats()["dead"]`` of a layer that computes every expert: an expert whose mean share
#: of the (normalised) gate mass is below ``DEAD_SHARE / K`` counts as dead
DEAD_SHARE = 1e-3  # cv^2 = var / (mean^2 + eps): zero, not NaN, when nothing was routed


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
    #: (N, G, k) bool, False for assignments dropped by ``capacity_factor``; None without capacity
    #: (then ``gates`` are already zero where False)
    kept: Tensor | None = None


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


def select_top_k(
    logits: Tensor, top_k: int, selection_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Keep the ``top_k`` largest logits of each row: ``(*, K) -> gates (*, k), index (*, k)``.

    ``selection_bias`` (broadcast to ``logits``; DeepSeek-V3's loss-free balancing) is added to
    the logits only to choose the kept experts: the gates are computed from the unbiased logits.

    - ``top_k >= 2``: the gates are the softmax over the kept logits (Shazeer et al. 2017); the
      softmax runs after the selection, so the gates sum to 1 and depend on every kept logit.
    - ``top_k == 1``: a softmax over one kept logit is the constant 1, which gives the router no
      gradient from the task loss. The gate is instead the chosen expert's probability under the
      softmax over all K logits (Switch Transformer, Fedus et al. 2021), which does.
    """
    if selection_bias is None:
        kept, index = logits.topk(top_k, dim=-1)
    else:
        index = (logits + selection_bias).topk(top_k, dim=-1).indices
        kept = logits.gather(-1, index)
    if top_k == 1:
        return torch.softmax(logits, dim=-1).gather(-1, index), index
    return torch.softmax(kept, dim=-1), index


def route(
    features: Tensor,
    gating_kernel: Tensor,
    gating_bias: Tensor | None,
    noise_kernel: Tensor | None,
    *,
    n_experts: int,
    top_k: int | None,
    gating_activation: Callable[[Tensor, int], Tensor],
    dtype: torch.dtype,
    hidden_kernel: Tensor | None = None,
    hidden_bias: Tensor | None = None,
    temperature: float = 1.0,
    selection_bias: Tensor | None = None,
    explicit_index: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """The router: gate features ``(N, F)`` -> ``(logits, routed_logits, noise_std, gates,
    index)``, each ``(N, G, K)`` but gates and index ``(N, G, k)`` (index None when every expert
    is kept, in order: a dense mixture or ``top_k == n_experts``, unless ``explicit_index``).

    ``F`` is the gating kernel's leading size and ``G * K`` its trailing one. ``noise_kernel``
    (given only in training with noisy gating) adds ``N(0, std^2)`` noise to the logits, ``std =
    softplus(features @ noise_kernel) + NOISE_EPSILON``. Runs in ``dtype`` with autocast off.

    - ``hidden_kernel`` ``(F, H)`` (any shape with F leading elements) and ``hidden_bias``
      ``(H,)``: a hidden layer first, ``features <- relu(features @ hidden_kernel + bias)``;
      the gating (and noise) kernel then reads ``H`` features.
    - ``temperature`` tau: the logits, the noisy logits and the noise std are divided by tau, so
      ``gates = activation(logits / tau)``; the returned logits are the divided ones.
    - ``selection_bias`` ``(G, K)``: added to the (divided) logits only to choose the top-k.
    - ``explicit_index``: return the kept experts' index also for ``top_k == n_experts``
      (every expert kept, sorted by logit), for capacity limits.
    """
    n, k = features.shape[0], n_experts
    with autocast_off(features.device.type):
        features = features.to(dtype)
        if hidden_kernel is not None:
            hidden = hidden_kernel.reshape(features.shape[1], -1).to(dtype)
            if hidden_bias is None:
                features = torch.relu(features @ hidden)
            else:
                features = torch.relu(torch.addmm(hidden_bias.to(dtype), features, hidden))
        kernel = gating_kernel.reshape(features.shape[1], -1).to(dtype)
        if gating_bias is None:
            logits = features @ kernel
        else:
            logits = torch.addmm(gating_bias.reshape(-1).to(dtype), features, kernel)
        logits = logits.view(n, kernel.shape[1] // k, k)
        noise_std = None
        routed = logits
        if noise_kernel is not None:
            noise_kernel = noise_kernel.reshape(kernel.shape).to(dtype)
            noise_std = F.softplus(features @ noise_kernel).view_as(logits) + NOISE_EPSILON
            routed = logits + torch.randn_like(logits) * noise_std
        if temperature != 1.0:  # skipped at 1: the default's results stay bit for bit
            noisy = routed is not logits
            logits = logits / temperature
            routed = routed / temperature if noisy else logits
            noise_std = None if noise_std is None else noise_std / temperature
        index = None
        if top_k is None:
            gates = gating_activation(routed, -1)
        elif top_k == k and not explicit_index:
            gates = torch.softmax(routed, dim=-1)
        else:
            bias = None if selection_bias is None else selection_bias.to(dtype)
            gates, index = select_top_k(routed, top_k, bias)
    return logits, routed, noise_std, gates, index


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
    if record.index is not None:  # top-k: an expert (of a group) no pair chose is dead
        dead = (expert_counts(record.index, n_experts) == 0).float().mean()
    else:  # every expert computed: dead when its mean share of the gate mass is negligible
        share = p.view(-1, record.logits.shape[1], n_experts).mean(0)  # (G, K)
        dead = (share < DEAD_SHARE / n_experts).float().mean()
    kept = record.kept
    dropped = importance.new_zeros(()) if kept is None else 1.0 - kept.float().mean()
    stats = {"importance": importance, "load": load, "entropy": entropy}
    return {**stats, "dead": dead, "dropped": dropped}


def expert_counts(index: Tensor, n_experts: int) -> Tensor:
    """Kept experts ``(N, G, k)`` -> assignments per group and expert ``(G, K)`` (int64), with
    static shapes (``torch.compile(fullgraph=True)`` traces it)."""
    return F.one_hot(index, n_experts).sum((0, 2))


def autocast_enabled(device: str) -> bool:
    """Whether autocast is on for ``device`` (a device type such as ``"cpu"``; False for device
    types without autocast, such as ``"meta"``)."""
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def autocast_off(device: str) -> contextlib.AbstractContextManager[object]:
    """Autocast disabled for ``device`` when it is on there, else a no-op context."""
    if autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
