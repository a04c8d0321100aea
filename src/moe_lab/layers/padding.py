"""Keras padding modes (valid / same / causal) for N-d convolutions, as per-dimension amounts."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

#: a size of every spatial dim: one int for all, or one int per dim
SizeSpec = int | Sequence[int]
PaddingSpec = str | int | Sequence[int]
PADDING_MODES = ("valid", "same", "causal")


def _ints(value: object, ndim: int, argname: str) -> tuple[int, ...]:
    """An int broadcast to ``ndim`` ints, or a sequence of exactly ``ndim`` ints (no floats, no
    bools: ``kernel_size=2.5`` is a mistake, not a 2)."""
    expected = f"an int or a sequence of {ndim} int{'s' if ndim > 1 else ''}"
    if isinstance(value, bool):
        raise ValueError(f"{argname} must be {expected}, got {value!r}")
    if isinstance(value, int):
        return (value,) * ndim
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{argname} must be {expected}, got {value!r}")
    try:
        if any(isinstance(v, bool) for v in value):
            raise TypeError
        values = tuple(operator.index(v) for v in value)
    except TypeError:
        raise ValueError(f"{argname} must be {expected}, got {value!r}") from None
    if len(values) != ndim:
        raise ValueError(f"{argname} must have {ndim} entries (one per spatial dim), got {value!r}")
    return values


def as_tuple(value: SizeSpec, ndim: int, argname: str) -> tuple[int, ...]:
    """Broadcast an int to ``ndim`` positive ints, or check a sequence has ``ndim`` positive ints."""
    values = _ints(value, ndim, argname)
    if any(v < 1 for v in values):
        raise ValueError(f"{argname} entries must be positive integers (>= 1), got {value!r}")
    return values


def check_padding(padding: PaddingSpec, ndim: int) -> str | tuple[int, ...]:
    """Validate at construction: a mode name, or non-negative ints (symmetric, as nn.Conv)."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode not in PADDING_MODES:
            raise ValueError(
                f"padding: unknown mode {padding!r}; expected one of 'valid', 'same', "
                f"'causal' (1D only), or non-negative ints"
            )
        if mode == "causal" and ndim != 1:
            raise ValueError(
                f"padding='causal' is only defined for 1D convolutions, got a {ndim}D layer; "
                "use 'valid', 'same' or explicit ints"
            )
        return mode
    amounts = _ints(padding, ndim, "padding")
    if any(p < 0 for p in amounts):
        raise ValueError(f"padding amounts must be >= 0, got {padding!r}")
    return amounts


def pad_amounts(
    padding: str | tuple[int, ...],
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per spatial dim, with Keras' output lengths:

    - valid: none;
    - same: output ``ceil(n / s)``, total ``max((out-1)s + (k-1)d + 1 - n, 0)``, smaller half before;
    - causal: ``(k-1)d`` before, none after;
    - ints: symmetric, as in ``nn.Conv``.
    """
    if isinstance(padding, tuple):
        return tuple((p, p) for p in padding)
    amounts = []
    for n, k, s, d in zip(input_size, kernel_size, stride, dilation, strict=True):
        span = (k - 1) * d + 1
        if padding == "valid":
            amounts.append((0, 0))
        elif padding == "causal":
            amounts.append((span - 1, 0))
        else:
            out = math.ceil(n / s)
            total = max((out - 1) * s + span - n, 0)
            amounts.append((total // 2, total - total // 2))
    return tuple(amounts)


def output_size(
    input_size: Sequence[int],
    pads: Sequence[tuple[int, int]],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    """Convolution output length per dim: ``floor((n + before + after - (k-1)d - 1) / s) + 1``."""
    return tuple(
        (n + before + after - (k - 1) * d - 1) // s + 1
        for n, (before, after), k, s, d in zip(
            input_size, pads, kernel_size, stride, dilation, strict=True
        )
    )
