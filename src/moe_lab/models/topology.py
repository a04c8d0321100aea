"""The CNN's topology as data: parsing, validation, width scaling and spatial-size tracking.

A topology (usually ``${data.topology}`` from the dataset config) looks like::

    blocks:            # each block: convs (each followed by ReLU), then max-pool, then dropout
      - {channels: [32, 32], kernel_size: 3, padding: [same, valid], pool: 2, dropout: 0.25}
      - {channels: [64, 64], kernel_size: 3, padding: [same, valid], pool: 2, dropout: 0.25}
    dense_units: 512
    dense_dropout: 0.5
    batch_norm: false  # true: BatchNorm after every conv (plain or MoE), before its activation

Per block:

- ``channels``: output channels of each conv, one entry per conv (required).
- ``kernel_size``: an int for every conv and spatial dim, or a list with one entry per conv
  (each an int or one int per spatial dim). Required.
- ``padding``: ``"valid"`` (default), ``"same"``, ``"causal"`` (1D only) with Keras' output
  lengths, or ints; a single value for every conv, or a list with one entry per conv.
- ``pool``: max-pool size (= stride, Keras' default), an int or one int per spatial dim;
  ``null`` or ``0`` for no pooling (default).
- ``dropout``: dropout rate after the block (default 0).

Works on plain dicts/lists and on OmegaConf containers (any ``Mapping`` / ``Sequence``), so this
module needs neither Hydra nor OmegaConf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moe_lab.layers.padding import (
    PaddingSpec,
    as_tuple,
    check_padding,
    output_size,
    pad_amounts,
)

BLOCK_KEYS = ("channels", "kernel_size", "padding", "pool", "dropout")
TOPOLOGY_KEYS = ("blocks", "dense_units", "dense_dropout", "batch_norm")
_HINT = (
    "choose a smaller topology (override data.topology=..., e.g. fewer blocks, 'same' padding "
    "or no pooling) or a larger input"
)


@dataclass(frozen=True)
class BlockSpec:
    """One validated block: ``len(channels)`` convs, then an optional max-pool, then dropout.

    ``kernel_sizes`` and ``paddings`` hold one entry per conv; ``pool`` is one int per spatial
    dim, or None for no pooling.
    """

    channels: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    paddings: tuple[str | tuple[int, ...], ...]
    pool: tuple[int, ...] | None
    dropout: float


@dataclass(frozen=True)
class TopologySpec:
    """A validated topology for inputs with ``ndim`` spatial dims."""

    ndim: int
    blocks: tuple[BlockSpec, ...]
    dense_units: int
    dense_dropout: float
    batch_norm: bool = False  # BatchNorm after every conv, before its activation

    def base_widths(self) -> tuple[int, ...]:
        """Every conv's channels (block by block), then the hidden dense width: the numbers a
        width multiplier scales."""
        return (*(c for block in self.blocks for c in block.channels), self.dense_units)

    def scaled(self, width_multiplier: float) -> TopologySpec:
        """The same topology with every conv's channels and the hidden dense width multiplied
        by ``width_multiplier`` (rounded half up, at least 1; see :func:`scale_width`)."""
        check_width_multiplier(width_multiplier)
        blocks = tuple(
            BlockSpec(
                channels=tuple(scale_width(c, width_multiplier) for c in block.channels),
                kernel_sizes=block.kernel_sizes,
                paddings=block.paddings,
                pool=block.pool,
                dropout=block.dropout,
            )
            for block in self.blocks
        )
        return TopologySpec(
            ndim=self.ndim,
            blocks=blocks,
            dense_units=scale_width(self.dense_units, width_multiplier),
            dense_dropout=self.dense_dropout,
            batch_norm=self.batch_norm,
        )


def scale_width(width: int, width_multiplier: float) -> int:
    """``max(1, floor(width * m + 0.5))``: round half up (not Python's half-to-even, so a width
    is a monotone step function of ``m``), never below one channel."""
    return max(1, math.floor(width * width_multiplier + 0.5))


def check_width_multiplier(width_multiplier: float) -> float:
    try:
        m = float(width_multiplier)
    except (TypeError, ValueError):
        raise ValueError(
            f"width_multiplier must be a positive number, got {width_multiplier!r}"
        ) from None
    if not math.isfinite(m) or m <= 0:
        raise ValueError(f"width_multiplier must be a finite number > 0, got {width_multiplier!r}")
    return m


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _rate(value: Any, where: str) -> float:
    try:
        rate = float(0.0 if value is None else value)
    except (TypeError, ValueError):
        raise ValueError(f"topology: {where} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"topology: {where} must be in [0, 1), got {value!r}")
    return rate


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"topology: {where} must be a positive integer, got {value!r}")
    return value


def _per_conv(value: Any, n_convs: int, where: str, scalar_types: tuple[type, ...]) -> list[Any]:
    """A value shared by every conv of a block, or a list with one entry per conv."""
    if isinstance(value, scalar_types) and not isinstance(value, bool):
        return [value] * n_convs
    if _is_list(value):
        entries = list(value)
        if len(entries) != n_convs:
            raise ValueError(
                f"topology: {where} lists {len(entries)} entries but the block has {n_convs} "
                f"convs (one per entry of 'channels'); give one value for all convs or one per conv"
            )
        return entries
    raise ValueError(f"topology: {where} must be a single value or a list per conv, got {value!r}")


def _parse_block(index: int, block: Any, ndim: int) -> BlockSpec:
    where = f"block {index}"
    if not isinstance(block, Mapping):
        raise ValueError(
            f"topology: {where} must be a mapping with keys {BLOCK_KEYS}, got {block!r}"
        )
    unknown = sorted(set(block) - set(BLOCK_KEYS))
    if unknown:
        raise ValueError(f"topology: {where} has unknown keys {unknown}; allowed: {BLOCK_KEYS}")
    for key in ("channels", "kernel_size"):
        if key not in block:
            raise ValueError(f"topology: {where} needs '{key}'")

    raw_channels = block["channels"]
    if not _is_list(raw_channels) or len(raw_channels) == 0:
        raise ValueError(
            f"topology: {where}.channels must be a non-empty list (one entry per conv), "
            f"got {raw_channels!r}"
        )
    channels = tuple(_positive_int(c, f"{where}.channels[{j}]") for j, c in enumerate(raw_channels))
    n_convs = len(channels)

    kernel_sizes = []
    for j, k in enumerate(_per_conv(block["kernel_size"], n_convs, f"{where}.kernel_size", (int,))):
        try:
            kernel_sizes.append(as_tuple(list(k) if _is_list(k) else k, ndim, "kernel_size"))
        except ValueError as err:
            raise ValueError(f"topology: {where}.kernel_size (conv {j}): {err}") from None

    paddings = []
    for j, p in enumerate(
        _per_conv(block.get("padding", "valid"), n_convs, f"{where}.padding", (str, int))
    ):
        try:
            paddings.append(check_padding(list(p) if _is_list(p) else p, ndim))
        except ValueError as err:
            raise ValueError(f"topology: {where}.padding (conv {j}): {err}") from None

    raw_pool = block.get("pool")
    pool: tuple[int, ...] | None
    if raw_pool is None or (
        isinstance(raw_pool, int) and not isinstance(raw_pool, bool) and raw_pool == 0
    ):
        pool = None
    else:
        try:
            pool = as_tuple(list(raw_pool) if _is_list(raw_pool) else raw_pool, ndim, "pool")
        except ValueError as err:
            raise ValueError(
                f"topology: {where}.pool: {err} (use null or 0 for no pooling)"
            ) from None

    return BlockSpec(
        channels=channels,
        kernel_sizes=tuple(kernel_sizes),
        paddings=tuple(paddings),
        pool=pool,
        dropout=_rate(block.get("dropout"), f"{where}.dropout"),
    )


def parse_topology(topology: Mapping[str, Any] | TopologySpec, ndim: int) -> TopologySpec:
    """Validate a topology mapping (see the module docstring) for ``ndim`` spatial dims.

    Raises:
        ValueError: naming the offending key and what it should be.
    """
    if isinstance(topology, TopologySpec):
        if topology.ndim != ndim:
            raise ValueError(
                f"topology was parsed for {topology.ndim} spatial dims but the input has {ndim}"
            )
        return topology
    if not isinstance(topology, Mapping):
        raise ValueError(
            f"topology must be a mapping with keys {TOPOLOGY_KEYS} (usually ${{data.topology}}), "
            f"got {type(topology).__name__}: {topology!r}"
        )
    unknown = sorted(set(topology) - set(TOPOLOGY_KEYS))
    if unknown:
        raise ValueError(f"topology has unknown keys {unknown}; allowed: {TOPOLOGY_KEYS}")
    if "dense_units" not in topology:
        raise ValueError("topology needs 'dense_units' (the hidden dense width, e.g. 512)")
    batch_norm = topology.get("batch_norm", False)
    if not isinstance(batch_norm, bool):
        raise ValueError(f"topology.batch_norm must be true or false, got {batch_norm!r}")
    raw_blocks = topology.get("blocks") or []
    if not _is_list(raw_blocks):
        raise ValueError(f"topology.blocks must be a list of blocks, got {raw_blocks!r}")
    return TopologySpec(
        ndim=ndim,
        blocks=tuple(_parse_block(i, block, ndim) for i, block in enumerate(raw_blocks)),
        dense_units=_positive_int(topology["dense_units"], "dense_units"),
        dense_dropout=_rate(topology.get("dense_dropout"), "dense_dropout"),
        batch_norm=batch_norm,
    )


@dataclass(frozen=True)
class ConvGeometry:
    """Where one conv sits: its input spatial size, Keras (before, after) pads and output size."""

    input_size: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    output_size: tuple[int, ...]


def conv_geometry(
    input_size: tuple[int, ...], kernel_size: tuple[int, ...], padding: PaddingSpec
) -> ConvGeometry:
    """Keras output length of a stride-1, dilation-1 conv (valid: n - k + 1; same: n)."""
    ones = (1,) * len(input_size)
    pads = pad_amounts(padding, input_size, kernel_size, ones, ones)
    return ConvGeometry(input_size, pads, output_size(input_size, pads, kernel_size, ones, ones))


def pool_output_size(input_size: tuple[int, ...], pool: tuple[int, ...]) -> tuple[int, ...]:
    """Keras MaxPooling with ``strides = pool_size`` and 'valid' padding: ``floor((n - p) / p) + 1``."""
    return tuple((n - p) // p + 1 for n, p in zip(input_size, pool, strict=True))


def trace_spatial_sizes(
    spec: TopologySpec, input_shape: tuple[int, ...]
) -> tuple[list[list[ConvGeometry]], tuple[int, ...]]:
    """Follow the spatial size through every conv, per block, and check it stays >= 1.

    Args:
        spec: the (already width-scaled or not: widths do not matter here) topology.
        input_shape: ``(C, *spatial)``.

    Returns:
        one list of :class:`ConvGeometry` per block, and the spatial size after the last block.

    Raises:
        ValueError: if a conv or a pool would shrink a spatial dim below 1, naming the block,
        the layer and the sizes.
    """
    size = tuple(input_shape[1:])
    geometry: list[list[ConvGeometry]] = []
    for i, block in enumerate(spec.blocks):
        convs = []
        for j, (k, p) in enumerate(zip(block.kernel_sizes, block.paddings, strict=True)):
            geo = conv_geometry(size, k, p)
            if any(n < 1 for n in geo.output_size):
                raise ValueError(
                    f"topology too deep for input shape {tuple(input_shape)}: block {i} conv {j} "
                    f"(kernel_size {k}, padding {p!r}) takes spatial size {size} to "
                    f"{geo.output_size}; {_HINT}"
                )
            convs.append(geo)
            size = geo.output_size
        if block.pool is not None:
            pooled = pool_output_size(size, block.pool)
            if any(n < 1 for n in pooled):
                raise ValueError(
                    f"topology too deep for input shape {tuple(input_shape)}: block {i} max-pool "
                    f"{block.pool} takes spatial size {size} to {pooled}; {_HINT}"
                )
            size = pooled
        geometry.append(convs)
    return geometry, size
