"""Network builders: the original's CIFAR CNN for 1D/2D/3D inputs, its MoE twin, and plain CNNs
widened to match the MoE twin's parameters or FLOPs. Imports layers (and torch) only.

- :func:`build_model`: what ``conf/model/*.yaml`` instantiate; returns ``(net, facts)``.
- :class:`ConvNet`: the network (``features`` and ``classifier`` submodules).
- :func:`count_params`, :func:`count_flops`: trainable parameters; forward FLOPs per example.
"""

from .builder import BUILD_KINDS, BuiltModel, ModelFacts, build_model
from .complexity import count_flops, count_params
from .convnet import ConvNet
from .matching import MATCH_KINDS, WidthMatch, WidthMatchError, match_width
from .topology import BlockSpec, TopologySpec, parse_topology, scale_width, trace_spatial_sizes
from .variant import routing_variant

__all__ = [
    "BUILD_KINDS",
    "MATCH_KINDS",
    "BlockSpec",
    "BuiltModel",
    "ConvNet",
    "ModelFacts",
    "TopologySpec",
    "WidthMatch",
    "WidthMatchError",
    "build_model",
    "count_flops",
    "count_params",
    "match_width",
    "parse_topology",
    "routing_variant",
    "scale_width",
    "trace_spatial_sizes",
]
