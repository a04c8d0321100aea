"""The computation: per-input Jacobians ``dy/dx`` (``vmap`` of ``jacrev``), their sorted singular
values and spectrum statistics, gathered by :func:`run_experiment` into a
:class:`JacobianResult`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from moe_lab.analysis.spectrum import (
    condition_number,
    effective_rank,
    mean_spectrum,
    numerical_rank,
)
from moe_lab.run.jacobian_record import SPECTRA_COLUMNS, SpectrumStats

from .models import build_models, sample_inputs
from .settings import JacobianSettings

# ---------------------------------------------------------------------------------------------
# Jacobians and their spectra
# ---------------------------------------------------------------------------------------------


def input_jacobians(module: nn.Module, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """Per-input Jacobians ``J[n] = d module(x[n]) / d x[n]``.

    Args:
        module: maps ``(*, in)`` to ``(*, out)``, each row independently.
        x: ``(N, in)``.
        chunk_size: inputs per vmap chunk (None: all at once).

    Returns:
        ``(N, out, in)``.
    """
    if x.dim() != 2:
        raise ValueError(f"input_jacobians expects x of shape (N, in), got {tuple(x.shape)}")
    with torch.no_grad():  # jacrev builds its own graph; nothing outside needs one
        return vmap(jacrev(module), chunk_size=chunk_size)(x)


def singular_values(jac: Tensor) -> np.ndarray:
    """Singular values, descending, ``(N, min(out, in))``, computed in float64 (so the tiny ones of
    a float32 Jacobian are not lost to the SVD's own rounding)."""
    return torch.linalg.svdvals(jac.detach().to(torch.float64)).numpy()


def summarize_spectra(
    s: np.ndarray, shape: tuple[int, int], eps: float, *, model: str, n_experts: int | None
) -> SpectrumStats:
    """Statistics of ``(n, r)`` spectra of ``m x n`` matrices (see :class:`SpectrumStats`)."""
    n = s.shape[0]
    ranks = numerical_rank(s, shape, eps).astype(np.float64)
    eranks = effective_rank(s)
    conds = condition_number(s, shape, eps)
    median_cond = float(np.median(conds))
    return SpectrumStats(
        model=model,
        n_experts=n_experts,
        numerical_rank=float(ranks.mean()),
        numerical_rank_se=float(ranks.std(ddof=1) / math.sqrt(n)),
        effective_rank=float(eranks.mean()),
        effective_rank_se=float(eranks.std(ddof=1) / math.sqrt(n)),
        median_condition_number=median_cond if math.isfinite(median_cond) else None,
        singular_fraction=float(np.isinf(conds).mean()),
    )


# ---------------------------------------------------------------------------------------------
# The result and the experiment
# ---------------------------------------------------------------------------------------------


@dataclass
class JacobianResult:
    """What one run computed.

    Attributes:
        settings: the validated settings.
        singular_values: per model label, ``(n_inputs, width)`` sorted spectra.
        spectra: the run dir's spectra table (columns
            :data:`moe_lab.run.jacobian_record.SPECTRA_COLUMNS`).
        models: per model label (``dense_relu``, ``moe_K1``, ...), its statistics.
    """

    settings: JacobianSettings
    singular_values: dict[str, np.ndarray]
    spectra: pd.DataFrame
    models: dict[str, SpectrumStats] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per model: numerical rank, effective rank, median condition number."""
        rows = [
            {
                "model": label,
                "numerical_rank": m.numerical_rank,
                "effective_rank": m.effective_rank,
                "median_cond": (
                    math.inf if m.median_condition_number is None else m.median_condition_number
                ),
                "singular_frac": m.singular_fraction,
            }
            for label, m in self.models.items()
        ]
        return pd.DataFrame(rows)


def run_experiment(settings: JacobianSettings | None = None, **overrides: Any) -> JacobianResult:
    """Build the models, compute every Jacobian spectrum and its statistics.

    ``run_experiment(n_inputs=50, width=32, n_experts=(1, 20))`` is shorthand for passing
    ``JacobianSettings(...)``.
    """
    if settings is None:
        settings = JacobianSettings(**overrides)
    elif overrides:
        raise ValueError("pass either settings or keyword overrides, not both")
    with _torch_threads(settings.num_threads):
        return _run(settings)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous number."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(settings: JacobianSettings) -> JacobianResult:
    x = sample_inputs(settings)
    shape = (settings.width, settings.width)
    spectra: dict[str, np.ndarray] = {}
    models: dict[str, SpectrumStats] = {}
    frames = []
    for entry in build_models(settings):
        s = singular_values(input_jacobians(entry.module, x, settings.chunk_size))
        spectra[entry.label] = s
        mean, se = mean_spectrum(s)
        frames.append(
            pd.DataFrame(
                {
                    "model": entry.model,
                    "n_experts": pd.array([entry.n_experts] * len(mean), dtype="Int64"),
                    "index": np.arange(len(mean)),
                    "mean_singular_value": mean,
                    "se": se,
                }
            )
        )
        models[entry.label] = summarize_spectra(
            s, shape, settings.eps, model=entry.model, n_experts=entry.n_experts
        )
    table = pd.concat(frames, ignore_index=True)[list(SPECTRA_COLUMNS)]
    return JacobianResult(settings, spectra, table, models)
