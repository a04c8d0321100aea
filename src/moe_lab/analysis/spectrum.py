"""Summaries of singular-value spectra: numerical rank, effective rank, condition number, and the
mean sorted spectrum with its standard error.

Pure NumPy. Every function takes singular values ``s`` of shape ``(..., r)`` (one spectrum per
leading index, ``r = min(m, n)`` values of an ``m x n`` matrix, any order, all ``>= 0``) and reduces
the last axis, so one call handles a whole batch of matrices.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "condition_number",
    "effective_rank",
    "mean_spectrum",
    "numerical_rank",
    "rank_tolerance",
]


def _as_spectra(s: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(s, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] == 0:
        raise ValueError(f"expected singular values of shape (..., r) with r >= 1, got {arr.shape}")
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError("singular values must be finite and >= 0")
    return arr


def rank_tolerance(
    s: ArrayLike, shape: tuple[int, int], eps: float = float(np.finfo(np.float32).eps)
) -> NDArray[np.float64]:
    """NumPy's ``matrix_rank`` default threshold ``max(s) * max(m, n) * eps``, one per spectrum.

    ``eps`` defaults to float32's machine epsilon: the Jacobians are computed in float32, so
    singular values below this are indistinguishable from rounding noise.

    Returns: ``(...)``.
    """
    arr = _as_spectra(s)
    return arr.max(axis=-1) * max(shape) * eps


def numerical_rank(
    s: ArrayLike, shape: tuple[int, int], eps: float = float(np.finfo(np.float32).eps)
) -> NDArray[np.int64]:
    """Number of singular values strictly above :func:`rank_tolerance`. Returns ``(...)``."""
    arr = _as_spectra(s)
    tol = rank_tolerance(arr, shape, eps)
    return (arr > tol[..., None]).sum(axis=-1)


def effective_rank(s: ArrayLike) -> NDArray[np.float64]:
    """Effective rank of Roy & Vetterli (2007): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` and
    ``H`` the Shannon entropy in nats (``0 log 0 = 0``).

    It lies in ``[1, r]``: 1 for a rank-one matrix, ``r`` when all singular values are equal.
    The zero matrix (``sum s = 0``, where ``p`` is undefined) gets 0, the rank of that matrix.

    Returns: ``(...)``.
    """
    arr = _as_spectra(s)
    total = arr.sum(axis=-1, keepdims=True)
    p = np.divide(arr, total, out=np.zeros_like(arr), where=total > 0)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    erank = np.exp(-plogp.sum(axis=-1))
    return np.where(total[..., 0] > 0, erank, 0.0)


def condition_number(
    s: ArrayLike, shape: tuple[int, int], eps: float = float(np.finfo(np.float32).eps)
) -> NDArray[np.float64]:
    """``s_max / s_min`` over the ``min(m, n)`` singular values, ``inf`` where ``s_min`` is zero.

    "Zero" means at or below :func:`rank_tolerance` (the matrix is numerically rank-deficient):
    a ratio against rounding noise would be a large but meaningless finite number.

    Returns: ``(...)``.
    """
    arr = _as_spectra(s)
    s_max = arr.max(axis=-1)
    s_min = arr.min(axis=-1)
    singular = s_min <= rank_tolerance(arr, shape, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = s_max / s_min
    return np.where(singular, np.inf, ratio)


def mean_spectrum(s: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean of the spectra sorted in descending order, and its standard error.

    Args:
        s: ``(n, r)``, one spectrum per row (n >= 2 matrices).

    Returns:
        ``(mean, se)``, each ``(r,)``: ``mean[i]`` is the average over rows of the i-th largest
        singular value; ``se[i] = std[i] / sqrt(n)`` with the sample standard deviation (ddof=1).
    """
    arr = _as_spectra(s)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"mean_spectrum needs (n, r) spectra with n >= 2, got shape {arr.shape}")
    ordered = -np.sort(-arr, axis=-1)
    n = ordered.shape[0]
    return ordered.mean(axis=0), ordered.std(axis=0, ddof=1) / np.sqrt(n)
