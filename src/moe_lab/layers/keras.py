"""Porting trained weights from the original Keras layers (``DenseMoE``, ``Conv{1,2,3}DMoE``).

The original's weights and moe_lab's have the same names; the dense layer's have the same
layouts, and the conv layers' differ by a fixed permutation (Keras keeps kernels as
``(*kernel_size, C, O)`` and reads channels-last inputs):

================  ==================================  ======================================
weight            the original (Keras)                moe_lab
================  ==================================  ======================================
expert_kernel     ``(*ks, C, F*K)``                   ``(F*K, C, *ks)``
gating_kernel     ``(*S, C, F, K)`` (channels_last)   ``(C, *S, F, K)``
                  ``(C, *S, F, K)`` (channels_first)
expert_bias       ``(1, ..., 1, F, K)``               ``(F, K)``
gating_bias       ``(F, K)``                          ``(F, K)``
================  ==================================  ======================================

Dense: ``expert_kernel (in, units, K)``, ``gating_kernel (in, K)``, ``expert_bias (units, K)``,
``gating_bias (K,)`` on both sides. Channel ``f * K + k`` of the conv expert kernel is expert k of
filter f on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import PARAM_NAMES, MoEBase
from .conv import _ConvNdMoE
from .dense import DenseMoE


def load_keras_weights(
    layer: MoEBase,
    weights: Mapping[str, Any] | Sequence[Any],
    *,
    data_format: str = "channels_last",
) -> MoEBase:
    """Copy the original Keras layer's trained weights into ``layer`` (in place; returns it).

    Args:
        layer: a :class:`~moe_lab.layers.DenseMoE` or ``Conv{1,2,3}dMoE`` built with the
            original layer's sizes (conv layers: ``gate_input="full"`` and the same
            ``input_size``), biases enabled as in the original.
        weights: the original's arrays (NumPy arrays, tensors or nested lists) by name:
            ``{"expert_kernel": ..., "gating_kernel": ..., "expert_bias": ..., "gating_bias":
            ...}``, or a sequence in that order without the disabled biases, as Keras'
            ``layer.get_weights()`` returns them.
        data_format: the ORIGINAL layer's ``data_format`` (its default ``"channels_last"``),
            which fixes its gating kernel's layout. The moe_lab layer's own ``data_format`` may
            differ: the weights do not depend on it.

    Raises:
        ValueError: a missing, unexpected or misshapen weight (the message gives the shape the
            original would have).

    Example::

        layer = Conv2dMoE(3, 32, 2, 3, (32, 32), padding="same", data_format="channels_last",
                          expert_activation="relu", gating_activation="softmax")
        load_keras_weights(layer, keras_layer.get_weights())
    """
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(
            f"data_format must be the original layer's, 'channels_last' or 'channels_first', "
            f"got {data_format!r}"
        )
    _check_original_structure(layer)
    present = [name for name in PARAM_NAMES if getattr(layer, name) is not None]
    if isinstance(weights, Mapping):
        arrays = dict(weights)
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        if len(weights) != len(present):
            raise ValueError(
                f"expected {len(present)} arrays in the order {present} (Keras' get_weights() "
                f"of a layer with these biases), got {len(weights)}"
            )
        arrays = dict(zip(present, weights, strict=True))
    else:
        raise ValueError(f"weights must be a dict by name or a list, got {type(weights).__name__}")
    unexpected = sorted(set(arrays) - set(present))
    missing = [name for name in present if name not in arrays]
    if unexpected or missing:
        raise ValueError(
            f"{type(layer).__name__} has weights {present}; missing {missing}, unexpected "
            f"{unexpected} (a bias the original has needs use_*_bias=True here, and vice versa)"
        )
    to_ours = _permutations(layer, data_format)
    converted = {}
    for name in present:  # check every array before copying any: nothing is half-loaded
        value = torch.as_tensor(arrays[name])
        keras_shape, convert = to_ours[name]
        if tuple(value.shape) != keras_shape:
            raise ValueError(
                f"{name}: the original's layout for this layer is {keras_shape}, got "
                f"{tuple(value.shape)}"
            )
        converted[name] = convert(value)
    with torch.no_grad():
        for name, value in converted.items():
            param = getattr(layer, name)
            param.copy_(value.to(dtype=param.dtype, device=param.device))
    return layer


def _check_original_structure(layer: MoEBase) -> None:
    """ValueError for a layer whose weights the original has no counterpart for."""
    grouped = isinstance(layer, _ConvNdMoE) and layer.n_gates != layer.out_channels
    extra = {
        "gate_groups": grouped,
        "gate_hidden": getattr(layer, "gate_hidden", None) is not None,
        "n_shared_experts": bool(getattr(layer, "n_shared_experts", 0)),
    }
    used = [name for name, on in extra.items() if on]
    if used:
        raise ValueError(
            f"the original layer has one gate per filter, no hidden gate layer and no shared "
            f"experts; build the layer without {used} to load its weights"
        )


def _permutations(layer: MoEBase, data_format: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per weight: the original's shape and the map from it to ours."""
    if isinstance(layer, DenseMoE):
        same = lambda t: t  # noqa: E731
        return {name: (tuple(getattr(layer, name).shape), same) for name in PARAM_NAMES}
    if not isinstance(layer, _ConvNdMoE):
        raise ValueError(f"expected a moe_lab MoE layer, got {type(layer).__name__}")
    if layer.gate_input != "full":
        raise ValueError(
            "the original's gate reads the whole input volume: build the layer with "
            "gate_input='full' (and the original's input_size) to load its weights"
        )
    d = layer.ndim
    c, f, k = layer.in_channels, layer.out_channels, layer.n_experts
    ks, size = layer.kernel_size, layer.input_size
    assert size is not None
    if data_format == "channels_last":
        gating = ((*size, c, f, k), lambda t: t.permute(d, *range(d), d + 1, d + 2))
    else:
        gating = ((c, *size, f, k), lambda t: t)
    return {
        "expert_kernel": ((*ks, c, f * k), lambda t: t.permute(d + 1, d, *range(d))),
        "gating_kernel": gating,
        "expert_bias": ((*(1,) * d, f, k), lambda t: t.reshape(f, k)),
        "gating_bias": ((f, k), lambda t: t),
    }
