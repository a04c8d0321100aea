"""Mixture-of-experts layers. Imports torch only.

- :class:`DenseMoE`: ``(*, in) -> (*, out)``, K dense experts mixed by a learned gate.
- :class:`Conv1dMoE`, :class:`Conv2dMoE`, :class:`Conv3dMoE`: each output filter mixes K
  convolution kernels, gated from the whole input volume.
"""

from .base import MoEBase
from .conv import Conv1dMoE, Conv2dMoE, Conv3dMoE
from .dense import DenseMoE
from .options import ACTIVATION_NAMES

__all__ = ["ACTIVATION_NAMES", "Conv1dMoE", "Conv2dMoE", "Conv3dMoE", "DenseMoE", "MoEBase"]
