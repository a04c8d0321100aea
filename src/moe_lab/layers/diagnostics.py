"""What a mixture's weights say about it: how alike its experts are.

Expert collapse (every expert learning the same kernel) is the most-reported failure of mixtures
of experts; at initialisation independent experts are nearly orthogonal (similarity ≈ 0), and a
mixture whose experts converge to one kernel has similarity → 1 and is a single layer in
disguise.
"""

from __future__ import annotations

import torch

from .base import MoEBase


def expert_vectors(layer: MoEBase) -> torch.Tensor:
    """Each output unit's K expert weight vectors, ``(units, K, fan_in)``: a conv layer's filter
    ``f`` has experts ``expert_kernel[f·K + k]`` ``(in, *kernel)``; a dense layer's unit ``j`` has
    ``expert_kernel[:, j, k]`` ``(in,)``."""
    kernel = layer.expert_kernel.detach()
    k = layer.n_experts
    if kernel.dim() == 3 and kernel.shape[-1] == k and not hasattr(layer, "kernel_size"):
        return kernel.permute(1, 2, 0)  # dense (in, out, K) -> (out, K, in)
    return kernel.reshape(kernel.shape[0] // k, k, -1)


def expert_similarity(layer: MoEBase) -> float:
    """The mean cosine similarity between two different experts of one output unit, averaged over
    the units: ``mean_f mean_{k≠l} cos(w_fk, w_fl)``. NaN with one expert."""
    vectors = expert_vectors(layer).float()
    k = vectors.shape[1]
    if k < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    cosines = unit @ unit.transpose(1, 2)  # (units, K, K)
    off_diagonal = cosines.sum(dim=(1, 2)) - cosines.diagonal(dim1=1, dim2=2).sum(dim=1)
    return float((off_diagonal / (k * (k - 1))).mean())


__all__ = ["expert_similarity", "expert_vectors"]
