"""Loss-free load balancing (``balance="aux_free"``; DeepSeek-V3, Wang et al. 2024,
"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").

A per-(group, expert) bias ``b`` is added to the gate logits only to CHOOSE the top-k experts
(:func:`~moe_lab.layers.routing.select_top_k`); the kept gates are still computed from the
unbiased logits, so the bias steers the load without entering the output or the gradient. After
each training forward the bias moves against that forward's load imbalance::

    b[g, e] += rate * sign(mean_e'(load[g, e']) - load[g, e])

``load[g, e]`` the number of the batch's (sample, group g) assignments routed to expert e (the
router's choice, before any capacity drop). Overloaded experts lose ``rate``, underloaded ones
gain it; ``sign`` makes the count's scale irrelevant.

Imports torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routing import expert_counts


@torch.no_grad()
def update_balance_bias(bias: Tensor, index: Tensor, rate: float) -> None:
    """One update of ``bias (G, K)`` in place from the kept experts ``index (N, G, k)``."""
    counts = expert_counts(index, bias.shape[-1]).to(bias.dtype)  # (G, K)
    bias.add_(torch.sign(counts.mean(-1, keepdim=True) - counts), alpha=rate)
