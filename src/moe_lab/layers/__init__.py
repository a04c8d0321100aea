"""Mixture-of-experts layers. Imports torch only.

- :class:`DenseMoE`: ``(*, in) -> (*, out)``, K dense experts mixed by a learned gate.
- :class:`Conv1dMoE`, :class:`Conv2dMoE`, :class:`Conv3dMoE`: each output filter mixes K
  convolution kernels, gated from the whole input volume (or its average-pooled channels).

Every layer is the original's dense (soft) mixture by default; ``top_k`` routes each sample (and
filter) to its k best experts and computes only those, ``noisy_gating`` adds Shazeer et al.'s
learned noise, and ``aux_losses()`` / ``routing_stats()`` read the last forward's routing
(see :mod:`moe_lab.layers.routing`). The variant keywords (``gate_groups``, ``gate_hidden``,
``gate_temperature``, ``balance``, ``capacity_factor``, ``n_shared_experts``; see
:class:`MoEBase`) are off by default.

Porting from the original Keras layers: :func:`load_keras_weights` maps their trained weights
onto a layer; conv layers take ``data_format="channels_last"`` for the original's input layout.
"""

from .base import MoEBase
from .conv import Conv1dMoE, Conv2dMoE, Conv3dMoE
from .dense import DenseMoE
from .keras import load_keras_weights
from .options import ACTIVATION_NAMES
from .routing import AUX_LOSS_NAMES, EXPERT_BACKENDS, GATE_INPUTS

__all__ = [
    "ACTIVATION_NAMES",
    "AUX_LOSS_NAMES",
    "EXPERT_BACKENDS",
    "GATE_INPUTS",
    "Conv1dMoE",
    "Conv2dMoE",
    "Conv3dMoE",
    "DenseMoE",
    "MoEBase",
    "load_keras_weights",
]
