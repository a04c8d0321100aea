r"""Variance-preserving expert initialisation: the expert kernel scale that makes a mixture's
output variance at init that of ONE expert (``experts.variance_preserving_init``).

Derivation. A layer's output, per filter and position, is ``y = sum_k g_k e_k + sum_s e_s``: the
gated experts ``e_k`` (before the mix, ``e_k = f(w_k . x + c_k)``; linear experts and
CondConv's kernel mixing give the same sum) plus S always-on shared experts. At init the experts'
kernels are independent zero-mean draws of one distribution, independent of the gate's, so for a
given input the ``e_k`` are independent with a common variance ``v`` (over the draws), and

.. math:: \mathrm{Var}(y) = v \, (\mathrm{E}[\textstyle\sum_k g_k^2] + S).

Scaling every expert kernel by ``r = (E[sum g^2] + S)^{-1/2}`` scales ``v`` by ``r^2`` (biases
start at zero; exact for linear and positively homogeneous experts such as relu, whose mean
scales too, approximate for the others), so ``Var(y) = v``: one expert's. The conv layers' scale
multiplies the kernel's standard deviation (``std = s / sqrt(fan_in)``), so they get ``s = r``;
the dense layer's multiplies its variance (Keras' ``VarianceScaling``), so it gets ``s = r^2``.

``E[sum g^2]`` with gates of equal logits (no information in the gate):

- softmax over K experts (the original's dense mixture): ``g_k = 1/K``, ``sum g^2 = 1/K``:
  averaging K independent experts divides the variance by K, and ``r = sqrt(K)``;
- top-k, k >= 2: a softmax over the k kept logits, ``1/k``;
- top-1 (Switch): the kept gate is the chosen expert's probability under the softmax over all K,
  ``1/K``, so ``1/K^2``;
- an elementwise gate ``a`` (CondConv's sigmoid): ``K a(0)^2`` (sigmoid: ``K/4``, 1 at K = 4:
  CondConv's K=4 mixture of independent kernels already has one kernel's variance);
- plus S for the shared experts.

The logits are not equal at init, though: they are drawn, ``z_k ~ N(0, sigma^2)``, and uneven
gates have a larger ``sum g^2`` (over K=8 logits of std 1 the softmax's is about 1.9/K, and
the top-1 gate's root mean square about 3/K, not 1/K). So ``E[sum g^2]`` is taken over those logits (a fixed-seed Monte Carlo
average, which draws nothing from torch's global generator), with ``sigma^2`` the logits' variance
at init for inputs of unit variance, uncorrelated across positions (:func:`conv_logit_variance`,
:func:`dense_logit_variance`), divided by the layer's ``gate_temperature^2``; ``sigma = 0`` gives
the equal-logit values above. Pooled gates average the positions away (``sigma^2 = s_g^2 / P``),
so their gates are nearly even; the original's full-volume gates read the whole input
(``sigma^2 = s_g^2``). Inputs that are correlated across positions, or not of unit variance
(after a relu, say), spread the logits differently, so in a network the output's std at init is
one expert's only approximately (on unit-variance random inputs within a few percent, see
``tests/test_model_designs.py``); noise (``noisy_gating``, training only), a capacity limit and a temperature schedule (which sets
the temperature after init) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moe_lab.layers.options import ActivationSpec, resolve_activation

#: the keyword the option sets on every MoE layer
SCALE_KEYWORD = "expert_kernel_initializer_scale"
#: Monte Carlo draws of the K logits (the estimate's relative error is about 1%)
_SAMPLES = 1 << 14


def expected_gate_square_sum(
    n_experts: int,
    gating_activation: ActivationSpec,
    top_k: int | None = None,
    logit_std: float = 0.0,
) -> float:
    """``E[sum_k g_k^2]`` of one filter's kept gates when the K gate logits are independent
    ``N(0, logit_std^2)`` (``logit_std = 0``: equal logits); see the module docstring."""
    generator = torch.Generator().manual_seed(0)
    # on the host whatever the default device (a pre-flight builds networks on "meta")
    z = logit_std * torch.randn(
        _SAMPLES, n_experts, generator=generator, dtype=torch.float64, device="cpu"
    )
    if top_k is not None and top_k == 1:  # the chosen expert's probability over all K
        gates = torch.softmax(z, dim=-1).amax(dim=-1, keepdim=True)
    elif top_k is not None:  # a softmax over the kept logits
        gates = torch.softmax(z.topk(top_k, dim=-1).values, dim=-1)
    else:
        gates = resolve_activation(gating_activation, "gating_activation")(z, expert_dim=-1)
    total = float((gates**2).sum(dim=-1).mean())
    if not total > 0:
        raise ValueError(
            f"variance_preserving_init: gating_activation={gating_activation!r} gives zero gates "
            "at init, so no expert scale preserves the output variance; use softmax or sigmoid "
            "gates, or variance_preserving_init=false"
        )
    return total


def conv_logit_variance(moe_kwargs: Mapping[str, Any], input_size: Sequence[int]) -> float:
    """A conv MoE layer's gate-logit variance at init for unit-variance, position-uncorrelated
    inputs: its gating kernel has std ``s_g / sqrt(fan_in)`` over the whole input volume, so
    ``s_g^2``; pooled gates read the mean of P positions, ``s_g^2 / P``. (A ``gate_hidden``
    layer is He-initialised for its ReLU, which keeps this variance.)"""
    variance = float(moe_kwargs.get("gating_kernel_initializer_scale", 1.0)) ** 2
    if moe_kwargs.get("gate_input", "full") == "pooled":
        variance /= math.prod(input_size)
    return variance


def dense_logit_variance(moe_kwargs: Mapping[str, Any], in_features: int) -> float:
    """The dense MoE layer's gate-logit variance at init for unit-variance inputs: its gating
    kernel is uniform of variance ``s_g / fan`` with ``fan = (n + 1) / 2`` over ``n`` inputs (the
    gate's hidden width with ``gate_hidden``), so ``2 n s_g / (n + 1)``."""
    n = moe_kwargs.get("gate_hidden") or in_features
    return 2 * n * float(moe_kwargs.get("gating_kernel_initializer_scale", 1.0)) / (n + 1)


def variance_preserving_scale(
    n_experts: int,
    gating_activation: ActivationSpec,
    moe_kwargs: Mapping[str, Any],
    logit_variance: float,
) -> float:
    """``r = (E[sum g^2] + S)^{-1/2}``: the factor on the expert kernels' standard deviation that
    makes a MoE layer's output variance at init one expert's (module docstring). A conv layer's
    ``expert_kernel_initializer_scale`` is ``r``, the dense layer's ``r^2``.

    Raises:
        ValueError: ``moe_kwargs`` sets the scale itself, or the gates vanish at init.
    """
    if SCALE_KEYWORD in moe_kwargs:
        raise ValueError(
            f"variance_preserving_init sets {SCALE_KEYWORD} itself, and moe_kwargs sets it to "
            f"{moe_kwargs[SCALE_KEYWORD]!r}; drop one of the two"
        )
    tau = float(moe_kwargs.get("gate_temperature", 1.0))
    squares = expected_gate_square_sum(
        n_experts, gating_activation, moe_kwargs.get("top_k"), math.sqrt(logit_variance) / tau
    )
    return (squares + int(moe_kwargs.get("n_shared_experts", 0) or 0)) ** -0.5
