"""The experiment's figure: mean sorted Jacobian spectrum per model (the original's second figure).

Built as a :class:`matplotlib.figure.Figure` on the Agg canvas, without pyplot, as
:mod:`moe_lab.analysis.plots` builds its figures.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .compute import JacobianResult


def plot_jacobian_spectra(result: JacobianResult, ax: Axes | None = None) -> Figure:
    """Mean sorted Jacobian spectrum per model, log y, ±SE bands (the original's second figure).

    Draws on ``ax``, or on a new figure when None; returns the figure.
    """
    if ax is None:
        new = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(new)
        ax = new.subplots()
    figure = ax.get_figure()
    cfg = result.settings
    ks = list(cfg.n_experts)
    cmap = matplotlib.colormaps["viridis"]
    groups = result.spectra.groupby(["model", "n_experts"], dropna=False, sort=False)
    for (model, k), grp in groups:
        x = grp["index"].to_numpy() + 1
        mean = grp["mean_singular_value"].to_numpy()
        se = grp["se"].to_numpy()
        if pd.isna(k):
            color, label, style = "black", f"Dense + {model.removeprefix('dense_')}", "--"
        else:
            pos = ks.index(int(k)) / max(1, len(ks) - 1)
            color, label, style = cmap(0.9 * pos), f"MoE, K = {int(k)}", "-"
            if model == "moe_uniform":
                label, style = f"MoE, K = {int(k)}, constant gates", ":"
        ax.plot(x, mean, style, color=color, label=label, lw=1.5)
        ax.fill_between(x, np.clip(mean - se, 0, None), mean + se, color=color, alpha=0.2, lw=0)
    # Below the rank tolerance a singular value is rounding noise (float64 SVD of a float32
    # Jacobian reaches 1e-80): draw the tolerance and cut the axis just under it, so the cliff
    # where each spectrum becomes numerically zero shows without flattening the rest.
    tol = result.spectra["mean_singular_value"].max() * cfg.width * cfg.eps
    ax.axhline(tol, color="gray", ls=":", lw=1, label="rank tolerance")
    ax.set_yscale("log")
    top = (result.spectra["mean_singular_value"] + result.spectra["se"]).max()
    ax.set_ylim(tol / 10, top * 2)
    ax.set_xlabel("singular value index (descending)")
    ax.set_ylabel("mean singular value of dy/dx")
    ax.set_title(
        f"Input-output Jacobian spectrum, {cfg.width} -> {cfg.width}, "
        f"mean +- SE over {cfg.n_inputs} inputs ~ U(0,1)^{cfg.width}\n"
        f"MoE: {cfg.expert_activation} experts, {cfg.gating_activation} gates; seed {cfg.seed}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return figure
