"""The original's CIFAR CNN (Keras ``cifar10_cnn``) for 1D, 2D and 3D inputs, and its MoE twin."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE, MoEBase
from moe_lab.layers.options import Activation, ActivationSpec, resolve_activation

from .topology import TopologySpec, check_width_multiplier, parse_topology, trace_spatial_sizes
from .variance import (
    SCALE_KEYWORD,
    conv_logit_variance,
    dense_logit_variance,
    variance_preserving_scale,
)

KINDS = ("cnn", "moe")
INITS = ("keras", "torch")
#: where a MoE layer's expert activation acts: inside the mixture on each expert's output (the
#: original's), or once on the mixed output, after the layer (and its BatchNorm): CondConv's and
#: DynamicConv's linear experts
ACTIVATION_PLACEMENTS = ("before_mix", "after_mix")
# Set by the builder from the model's own geometry; a moe_kwargs entry for them is a mistake.
RESERVED_MOE_KWARGS = (
    "in_channels",
    "out_channels",
    "in_features",
    "out_features",
    "n_experts",
    "kernel_size",
    "input_size",
    "stride",
    "padding",
    "dilation",
    "expert_activation",
    "gating_activation",
)

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_MOE: dict[int, type[MoEBase]] = {1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}
_POOL: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_PAD: dict[int, type[nn.Module]] = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}
_NORM: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class BlockActivation(nn.Module):
    """A MoE layer's expert activation applied to the layer's (mixed) output, with
    ``activation_placement="after_mix"``; elementwise activations only."""

    def __init__(self, activation: Activation) -> None:
        super().__init__()
        if activation.is_softmax:
            raise ValueError(
                "activation_placement='after_mix' applies the expert activation to the mixed "
                "output, elementwise; expert_activation='softmax' normalises across experts, which "
                "the mixed output no longer has: use an elementwise activation or 'before_mix'"
            )
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(x, expert_dim=-1)

    def extra_repr(self) -> str:
        return self.activation.name


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``(C, *spatial)`` with 1 to 3 spatial dims, all positive ints."""
    try:
        shape = tuple(int(n) for n in input_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"input_shape must be (channels, *spatial) ints, got {input_shape!r}"
        ) from None
    if not 2 <= len(shape) <= 4 or any(n < 1 for n in shape):
        raise ValueError(
            f"input_shape must be (channels, *spatial) with 1 to 3 positive spatial sizes, e.g. "
            f"(3, 32, 32) for CIFAR images, got {input_shape!r}"
        )
    return shape


def check_moe_kwargs(moe_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain dict copy of the per-layer MoE keywords, rejecting those the builder sets."""
    if moe_kwargs is None:
        return {}
    if not isinstance(moe_kwargs, Mapping):
        raise ValueError(f"moe_kwargs must be a mapping of MoE layer keywords, got {moe_kwargs!r}")
    kwargs = dict(moe_kwargs)
    clash = sorted(set(kwargs) & set(RESERVED_MOE_KWARGS))
    if clash:
        raise ValueError(
            f"moe_kwargs may not set {clash}: the builder derives them from the topology and its "
            "own arguments (use n_experts=, expert_activation=, gating_activation= instead)"
        )
    return kwargs


class ConvNet(nn.Module):
    """The CIFAR CNN of the original (Keras' cifar10_cnn example) for 1D/2D/3D inputs, plain or MoE.

    ``kind="cnn"``: per block ``[Conv, ReLU] * n, MaxPool, Dropout``; then ``Flatten,
    Linear(dense_units), ReLU, Dropout, Linear(num_classes)``.

    ``kind="moe"``: every conv is a ``Conv{1,2,3}dMoE`` with the same filters and ``n_experts``
    experts per filter, the hidden dense a ``DenseMoE``; their expert activation replaces the
    ReLU. The classifier head stays a plain ``Linear``.

    Where a MoE layer's expert activation acts (``activation_placement``): ``"before_mix"`` (the
    original's) inside the layer, on each expert's output before the gates mix them; with
    ``"after_mix"`` (CondConv, DynamicConv) the layers get linear experts
    (``expert_activation=None``) and the block applies the activation once to the mixed output:
    ``[MoE, Activation] * n`` and ``DenseMoE, Activation``.

    ``topology.batch_norm`` puts a BatchNorm after every conv of every kind alike, before the
    activation: ``Conv, BN, ReLU`` (cnn), ``MoE, BN, Activation`` (moe, ``"after_mix"``) and
    ``MoE, BN`` (moe, ``"before_mix"``, whose activation is inside the layer). PyTorch's
    BatchNorm defaults (``eps=1e-5``, ``momentum=0.1``, affine); its 2 parameters per channel are
    counted in ``count_params`` (and so matched by the matched CNNs); its FLOPs, an elementwise
    affine map in eval mode (foldable into the conv), are not, as biases and activations are not.

    Convs use Keras padding (``'same'`` pads the smaller half before, the larger after); an
    asymmetric amount becomes an explicit zero-pad module before a plain conv.

    Args:
        input_shape: ``(C, *spatial)``, 1 to 3 spatial dims.
        num_classes: logits out.
        topology: a topology mapping (see :mod:`moe_lab.models.topology`) or a parsed spec.
        kind: ``"cnn"`` or ``"moe"``.
        n_experts: experts per MoE layer (K), used by ``kind="moe"``.
        expert_activation, gating_activation: of every MoE layer (``"relu"``, ``"softmax"`` as in
            the original's demo).
        width_multiplier: scales every conv's channels and the hidden dense width (rounded half
            up, at least 1).
        init: ``"keras"`` (Glorot-uniform kernels, zero biases) or ``"torch"`` (PyTorch defaults)
            for the plain convs and linears; MoE layers keep the original's init.
        moe_kwargs: extra keywords for every MoE layer (regularizers, constraints, routing...).
        activation_placement: ``"before_mix"`` (default) or ``"after_mix"``, see above
            (``kind="moe"`` only).
        variance_preserving_init: scale every MoE layer's expert kernels so that its output
            variance at init is one expert's (``expert_kernel_initializer_scale``, derived in
            :mod:`moe_lab.models.variance`); ``kind="moe"`` only.

    Shape:
        input ``(B, C, *spatial)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        topology: Mapping[str, Any] | TopologySpec,
        *,
        kind: str = "cnn",
        n_experts: int = 2,
        expert_activation: ActivationSpec = "relu",
        gating_activation: ActivationSpec = "softmax",
        width_multiplier: float = 1.0,
        init: str = "keras",
        moe_kwargs: Mapping[str, Any] | None = None,
        activation_placement: str = "before_mix",
        variance_preserving_init: bool = False,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if activation_placement not in ACTIVATION_PLACEMENTS:
            raise ValueError(
                f"activation_placement must be one of {ACTIVATION_PLACEMENTS}, got "
                f"{activation_placement!r}"
            )
        if not isinstance(variance_preserving_init, bool):
            raise ValueError(
                f"variance_preserving_init must be True or False, got {variance_preserving_init!r}"
            )
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.input_shape = check_input_shape(input_shape)
        self.ndim = len(self.input_shape) - 1
        self.kind = kind
        self.num_classes = num_classes
        self.width_multiplier = check_width_multiplier(width_multiplier)
        self.n_experts = n_experts if kind == "moe" else None
        self.init = init
        spec = parse_topology(topology, self.ndim).scaled(self.width_multiplier)
        self.topology = spec
        geometry, final_size = trace_spatial_sizes(spec, self.input_shape)
        self.spatial_sizes = [[g.output_size for g in convs] for convs in geometry]
        self.activation_placement = activation_placement
        extra = check_moe_kwargs(moe_kwargs)
        after_mix = kind == "moe" and activation_placement == "after_mix"
        # after the mix: linear experts, and the block applies the activation to their mixture
        self._block_activation = (
            resolve_activation(expert_activation, "expert_activation") if after_mix else None
        )
        moe_layer_kwargs = dict(
            n_experts=n_experts,
            expert_activation=None if after_mix else expert_activation,
            gating_activation=gating_activation,
            **extra,
        )
        self._variance_preserving = variance_preserving_init and kind == "moe"

        features, channels = self._conv_blocks(spec, geometry, moe_layer_kwargs)
        self.features = nn.Sequential(features)
        flat_features = channels * math.prod(final_size)
        self.classifier = nn.Sequential(
            self._dense_head(flat_features, spec, num_classes, moe_layer_kwargs)
        )

        if init == "keras":
            self._keras_init()

    def _conv_blocks(
        self, spec: TopologySpec, geometry: list, moe_layer_kwargs: dict[str, Any]
    ) -> tuple[OrderedDict[str, nn.Module], int]:
        """Per block ``[Conv, (BN,) ReLU] * n, MaxPool, Dropout`` (MoE convs replace Conv + ReLU,
        see the class docstring); returns the modules and the last block's channels."""
        d = self.ndim
        features: OrderedDict[str, nn.Module] = OrderedDict()
        channels = self.input_shape[0]
        for i, (block, convs) in enumerate(zip(spec.blocks, geometry, strict=True)):
            for j, (out_channels, k, padding, geo) in enumerate(
                zip(block.channels, block.kernel_sizes, block.paddings, convs, strict=True)
            ):
                name = f"block{i}_conv{j}"
                if self.kind == "moe":
                    features[name] = _CONV_MOE[d](
                        channels,
                        out_channels,
                        kernel_size=k,
                        input_size=geo.input_size,
                        padding=padding,
                        **self._with_init_scale(moe_layer_kwargs, input_size=geo.input_size),
                    )
                    norm = out_channels if spec.batch_norm else None
                    self._after_moe(features, norm, (f"block{i}_bn{j}", f"block{i}_act{j}"))
                else:
                    symmetric = all(before == after for before, after in geo.pads)
                    if not symmetric:
                        # F.pad order: last dim first, (before, after) each
                        amounts = tuple(a for pair in reversed(geo.pads) for a in pair)
                        features[f"block{i}_pad{j}"] = _PAD[d](amounts, 0.0)
                    conv_padding = tuple(b for b, _ in geo.pads) if symmetric else 0
                    features[name] = _CONV[d](channels, out_channels, k, padding=conv_padding)
                    if spec.batch_norm:
                        features[f"block{i}_bn{j}"] = _NORM[d](out_channels)
                    features[f"block{i}_relu{j}"] = nn.ReLU()
                channels = out_channels
            if block.pool is not None:
                features[f"block{i}_pool"] = _POOL[d](block.pool, stride=block.pool)
            if block.dropout > 0:
                features[f"block{i}_dropout"] = nn.Dropout(block.dropout)
        return features, channels

    def _with_init_scale(
        self,
        kwargs: dict[str, Any],
        input_size: tuple[int, ...] | None = None,
        in_features: int | None = None,
    ) -> dict[str, Any]:
        """A MoE layer's keywords, with ``variance_preserving_init`` its expert kernel scale: the
        std factor r for a conv layer (``input_size``), the variance factor r^2 for the dense
        layer (``in_features``): the layers' conventions (:mod:`moe_lab.models.variance`)."""
        if not self._variance_preserving:
            return kwargs
        if in_features is None:
            variance = conv_logit_variance(kwargs, input_size or ())
        else:
            variance = dense_logit_variance(kwargs, in_features)
        r = variance_preserving_scale(
            kwargs["n_experts"], kwargs["gating_activation"], kwargs, variance
        )
        return {**kwargs, SCALE_KEYWORD: r if in_features is None else r * r}

    def _after_moe(
        self,
        modules: OrderedDict[str, nn.Module],
        norm_channels: int | None,
        names: tuple[str, str],
    ) -> None:
        """What follows a MoE layer: a BatchNorm of ``norm_channels`` (a conv's, with
        ``topology.batch_norm``), then with ``activation_placement="after_mix"`` the activation;
        ``names``: the two modules' names."""
        if norm_channels is not None:
            modules[names[0]] = _NORM[self.ndim](norm_channels)
        if self._block_activation is not None and not self._block_activation.is_identity:
            modules[names[1]] = BlockActivation(self._block_activation)

    def _dense_head(
        self,
        flat_features: int,
        spec: TopologySpec,
        num_classes: int,
        moe_layer_kwargs: dict[str, Any],
    ) -> OrderedDict[str, nn.Module]:
        """``Flatten, Dense(dense_units) [+ ReLU], Dropout, Linear(num_classes)``."""
        classifier: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        if self.kind == "moe":
            classifier["dense"] = DenseMoE(
                flat_features,
                spec.dense_units,
                **self._with_init_scale(moe_layer_kwargs, in_features=flat_features),
            )
            self._after_moe(classifier, None, ("", "act"))
        else:
            classifier["dense"] = nn.Linear(flat_features, spec.dense_units)
            classifier["relu"] = nn.ReLU()
        if spec.dense_dropout > 0:
            classifier["dropout"] = nn.Dropout(spec.dense_dropout)
        classifier["head"] = nn.Linear(spec.dense_units, num_classes)
        return classifier

    def _keras_init(self) -> None:
        """Glorot-uniform kernels and zero biases for the plain convs and linears (Keras'
        defaults; the MoE layers have their own init)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def moe_layers(self) -> dict[str, MoEBase]:
        """The MoE layers by qualified name (e.g. ``"features.block0_conv0"``, ``"classifier.dense"``)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoEBase)}

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.ndim + 2 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"ConvNet was built for inputs (B, {', '.join(map(str, self.input_shape))}), got "
                f"shape {tuple(x.shape)}; build it with input_shape={tuple(x.shape[1:])}"
            )
        return self.classifier(self.features(x))

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind!r}", f"input_shape={self.input_shape}"]
        if self.n_experts is not None:
            parts.append(f"n_experts={self.n_experts}")
            if self.activation_placement != "before_mix":
                parts.append(f"activation_placement={self.activation_placement!r}")
        parts.append(f"width_multiplier={self.width_multiplier:g}")
        return ", ".join(parts)
