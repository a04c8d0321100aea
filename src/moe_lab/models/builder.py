"""``build_model``: the one entry point the configs in ``conf/model/`` instantiate.

It returns the network together with its facts (:class:`ModelFacts`: parameters, FLOPs, width
multiplier, what a matched CNN matched), as data the run record copies, never as attributes stuck
onto the module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from moe_lab.layers.keywords import takes_keywords_of

from .complexity import count_flops, count_params
from .convnet import INITS, ConvNet, check_input_shape, check_moe_kwargs
from .matching import MATCH_KINDS, WidthMatch, match_width
from .topology import TopologySpec, check_width_multiplier, parse_topology

BUILD_KINDS = ("cnn", "moe", "cnn_matched")


def _plain(value: Any) -> Any:
    """OmegaConf containers (or any Mapping / Sequence) -> plain dicts and lists, so the model
    and its facts never hold config objects."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelFacts:
    """What a built network is: the run record (``moe_lab.run.record.RunSummary``) copies these."""

    kind: str
    name: str
    n_experts: int | None  # None for the plain CNN; the matched K for cnn_matched
    width_multiplier: float
    init: str
    input_shape: list[int]
    num_classes: int
    params: int  # trainable parameters
    flops_per_example: int  # forward FLOPs of one example (torch.utils.flop_counter)
    widths: list[int]  # unscaled base widths of the topology (convs..., dense)
    moe_kwargs: dict[str, Any] | None = None
    match: str | None = None  # "params" | "flops" for cnn_matched
    match_target: int | None = None  # the MoE twin's params / FLOPs that were matched
    match_achieved: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BuiltModel(NamedTuple):
    """``build_model``'s result: the network and its facts."""

    net: ConvNet
    facts: ModelFacts


@takes_keywords_of(ConvNet, exclude=("kind",))
def build_model(
    kind: str,
    input_shape: Sequence[int],
    num_classes: int,
    topology: Mapping[str, Any],
    *,
    match: str = "params",
    match_tolerance: float = 0.01,
    name: str | None = None,
    **net_options: Any,
) -> BuiltModel:
    """Build the original's CNN, its MoE twin, or a plain CNN widened to match the MoE twin.

    ``n_experts``, the activations, ``width_multiplier``, ``init`` and ``moe_kwargs`` are
    :class:`ConvNet`'s keywords, with its defaults: taken as ``**net_options`` and shown in this
    signature (:func:`~moe_lab.layers.keywords.takes_keywords_of`).

    Args:
        kind: ``"cnn"`` (the original's CNN), ``"moe"`` (every conv and the hidden dense become MoE
            layers) or ``"cnn_matched"`` (a plain CNN whose width multiplier is searched so that
            its trainable parameters, or FLOPs with ``match="flops"``, match those of the
            ``"moe"`` model built from the same arguments).
        input_shape: one example's shape ``(C, *spatial)``, 1 to 3 spatial dims.
        num_classes: number of logits.
        topology: the block list and dense head (see :mod:`moe_lab.models.topology`).
        n_experts: experts per MoE layer K (for ``"moe"``, and the target of ``"cnn_matched"``).
        expert_activation, gating_activation: of every MoE layer.
        width_multiplier: scales every conv's channels and the hidden dense width (``"cnn"`` and
            ``"moe"``); ``"cnn_matched"`` searches it and rejects any other value than 1.
        init: ``"keras"`` (Glorot-uniform, zero biases) or ``"torch"`` for the plain layers.
        moe_kwargs: extra keywords for every MoE layer.
        match: ``"params"`` or ``"flops"`` (``"cnn_matched"`` only).
        match_tolerance: the largest relative error accepted by the matching.
        name: the run-naming label from the config; recorded in the facts.

    Returns:
        :class:`BuiltModel` ``(net, facts)``: the :class:`ConvNet` and its :class:`ModelFacts`.

    Shape:
        the model maps ``(B, *input_shape)`` to logits ``(B, num_classes)``.
    """
    n_experts, init = net_options["n_experts"], net_options["init"]
    if kind not in BUILD_KINDS:
        raise ValueError(f"kind must be one of {BUILD_KINDS}, got {kind!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if match not in MATCH_KINDS:
        raise ValueError(f"match must be one of {MATCH_KINDS}, got {match!r}")
    try:
        tolerance = float(match_tolerance)
    except (TypeError, ValueError):
        tolerance = float("nan")
    if not tolerance > 0:
        raise ValueError(f"match_tolerance must be a number > 0, got {match_tolerance!r}")
    shape = check_input_shape(input_shape)
    spec = parse_topology(_plain(topology), len(shape) - 1)
    moe_kwargs = _plain(check_moe_kwargs(net_options["moe_kwargs"]))
    width_multiplier = check_width_multiplier(net_options.pop("width_multiplier"))
    # ConvNet's keywords but the width multiplier (searched for cnn_matched): n_experts, the
    # activations, init, moe_kwargs
    common: dict[str, Any] = dict(
        net_options, input_shape=shape, num_classes=num_classes, moe_kwargs=moe_kwargs
    )

    matched: dict[str, Any] = {}
    if kind == "cnn_matched":
        if width_multiplier != 1.0:
            raise ValueError(
                f"kind='cnn_matched' searches the width multiplier itself; drop "
                f"width_multiplier={width_multiplier:g} (or use kind='cnn' to set it by hand)"
            )
        found, target = _match_plain_width(spec, common, match, tolerance)
        width_multiplier = found.width_multiplier
        matched = {"match": match, "match_target": target, "match_achieved": found.achieved}
    net = ConvNet(
        topology=spec,
        kind="cnn" if kind == "cnn_matched" else kind,
        width_multiplier=width_multiplier,
        **common,
    )

    facts = ModelFacts(
        kind=kind,
        name=name if name is not None else kind,
        n_experts=n_experts if kind != "cnn" else None,
        width_multiplier=width_multiplier,
        init=init,
        input_shape=list(shape),
        num_classes=num_classes,
        params=count_params(net),
        flops_per_example=count_flops(net, shape),
        widths=list(net.topology.base_widths()),
        moe_kwargs=moe_kwargs if kind != "cnn" else None,
        **matched,
    )
    return BuiltModel(net, facts)


def _match_plain_width(
    spec: TopologySpec, common: dict[str, Any], match: str, tolerance: float
) -> tuple[WidthMatch, int]:
    """The plain CNN's width multiplier whose params (or FLOPs) match the MoE twin's, and the
    twin's value. Candidates live on the meta device: shapes only, no memory, no RNG draws."""
    shape = common["input_shape"]

    def measure_of(model: ConvNet) -> int:
        return count_params(model) if match == "params" else count_flops(model, shape)

    with torch.device("meta"):
        target = measure_of(ConvNet(topology=spec, kind="moe", **common))

    def measure(multiplier: float) -> int:
        with torch.device("meta"):
            return measure_of(
                ConvNet(topology=spec, kind="cnn", width_multiplier=multiplier, **common)
            )

    return match_width(spec, measure, target, tolerance=tolerance, what=match), target
