"""Expert capacity (``capacity_factor``): each expert of a gate group takes at most
``C = ceil(capacity_factor * N * k / K)`` of a batch's ``N * k`` assignments (N samples, each
choosing k of K experts; capped at N, since a sample picks an expert at most once), in gate order;
the rest are dropped.

The order (which assignments an over-full expert keeps): within each gate group, all ``N * k``
assignments sorted by their gate value, highest first; equal gates in sample order, then in the
order of the sample's kept experts (its j-th kept expert before its (j+1)-th). Each expert keeps
its first C assignments in that order. A dropped assignment contributes nothing (its gate is set
to 0); the sample's other kept gates are NOT renormalised.

Every shape here depends only on ``(N, G, k, K)``, never on the routing itself (no ``nonzero``,
``bincount`` or host reads), so ``torch.compile(fullgraph=True)`` traces it: positions come from
a cumulative sum over one-hot assignments, and the dense layer's experts read their rows from a
``(K, C, in)`` buffer filled by a scatter whose dropped rows go to a spare row.

Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def expert_capacity(n: int, k: int, n_experts: int, factor: float) -> int:
    """Assignments an expert (of one gate group) may take: ``min(N, ceil(factor * N * k / K))``."""
    return min(n, math.ceil(factor * n * k / n_experts))


@torch.no_grad()
def queue_positions(gates: Tensor, index: Tensor, n_experts: int) -> Tensor:
    """Each assignment's place in its expert's queue: ``gates``, ``index`` ``(N, G, k)`` ->
    positions ``(N, G, k)`` (int64, 0-based), counting the same expert's assignments ahead of it
    in the module's order (gate value descending, then sample, then slot)."""
    n, groups, k = index.shape
    # (G, N*k), sample-major: a stable sort keeps equal gates in sample, then slot order
    flat_gates = gates.transpose(0, 1).reshape(groups, n * k)
    flat_index = index.transpose(0, 1).reshape(groups, n * k)
    order = torch.sort(flat_gates, dim=1, descending=True, stable=True).indices
    experts = flat_index.gather(1, order)  # (G, N*k) in priority order
    onehot = F.one_hot(experts, n_experts)  # (G, N*k, K)
    ahead = (onehot.cumsum(1) * onehot).sum(-1) - 1  # same-expert assignments before, in order
    positions = torch.empty_like(ahead).scatter_(1, order, ahead)  # back to sample-major
    return positions.view(groups, n, k).transpose(0, 1)


def capacity_dense(
    flat: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    index: Tensor,
    positions: Tensor,
    capacity: int,
    activation: Callable[[Tensor], Tensor],
) -> Tensor:
    """The dense layer's kept experts with static shapes: ``flat (N, in)``, ``weight (K, out, in)``
    (the sparse layer's expert-major storage),
    ``bias (K, out)`` or None, ``index`` and ``positions`` ``(N, k)`` -> each assignment's expert
    output ``(N, k, out)``, ``activation`` applied; dropped assignments (``positions >=
    capacity``) read an unused row (their gate is 0).

    Expert e's rows are ``buffer[e, :C]``: assignment (i, j) of expert e at queue position p
    lands in row p, one ``bmm`` runs all K experts on their ``(C, in)`` blocks, and each
    assignment reads its row back."""
    n, k = index.shape
    n_experts = weight.shape[0]
    kept = positions < capacity
    slots = n_experts * capacity
    dest = torch.where(kept, index * capacity + positions, slots).reshape(-1)  # spare row: slots
    rows = flat.unsqueeze(1).expand(n, k, flat.shape[1]).reshape(n * k, -1)
    # each kept destination is unique, so the sum is a copy; index_add has a plain backward
    buffer = flat.new_zeros(slots + 1, flat.shape[1]).index_add(0, dest, rows)
    buffer = buffer[:slots].view(n_experts, capacity, -1)
    # (K, out, C) = W @ buffer^T, so that the weight's gradient, grad @ buffer, comes out
    # (K, out, in) contiguous, the parameter's own layout: with buffer @ W^T it came out
    # transposed, and writing it into the parameter was a 16 MB strided copy at 512x512, K=16
    # (half the step)
    if bias is None:
        hidden = torch.bmm(weight, buffer.transpose(1, 2))
    else:
        hidden = torch.baddbmm(bias.unsqueeze(-1), weight, buffer.transpose(1, 2))
    hidden = activation(hidden.transpose(1, 2)).reshape(slots, -1)  # (K*C, out)
    return hidden.index_select(0, torch.where(kept.reshape(-1), dest, 0)).view(n, k, -1)
