"""Keras-style options of the MoE layers: activations, regularizers, constraints and bias
initializers, each given by name, by dict or as a callable.

Everything resolves at construction time, so a typo fails in the layer constructor with the list of
valid names, never deep inside the first forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

# An activation receives the tensor and the index of its experts axis. Only softmax uses the axis:
# as in the seed (Keras softmax over the last axis, which is the experts axis there) it normalises
# over experts; every other activation is elementwise.
ExpertActivation = Callable[[Tensor, int], Tensor]


def _keras_hard_sigmoid(x: Tensor) -> Tensor:
    # Keras 2.0's definition, not torch's x/6 + 1/2.
    return torch.clamp(0.2 * x + 0.5, 0.0, 1.0)


_ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": _keras_hard_sigmoid,
    "elu": F.elu,
    "selu": F.selu,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "gelu": F.gelu,
    "silu": F.silu,
    "exponential": torch.exp,
}

ACTIVATION_NAMES: tuple[str, ...] = ("linear", "softmax", *_ELEMENTWISE)

ActivationSpec = Union[str, Callable[[Tensor], Tensor], None]


@dataclass(frozen=True)
class Activation:
    """A resolved activation: ``act(x, expert_dim)``. ``name`` is used in ``extra_repr``."""

    name: str
    fn: Callable[[Tensor], Tensor] | None  # None: identity or softmax (see is_softmax)
    is_softmax: bool = False

    @property
    def is_identity(self) -> bool:
        return self.fn is None and not self.is_softmax

    def __call__(self, x: Tensor, expert_dim: int) -> Tensor:
        if self.is_softmax:
            return torch.softmax(x, dim=expert_dim)
        if self.fn is None:
            return x
        return self.fn(x)


def resolve_activation(spec: ActivationSpec, argname: str) -> Activation:
    """Turn ``None``, a name from :data:`ACTIVATION_NAMES` or a callable into an :class:`Activation`."""
    if spec is None or spec == "linear":
        return Activation("linear", None)
    if isinstance(spec, str):
        key = spec.lower()
        if key == "softmax":
            return Activation("softmax", None, is_softmax=True)
        if key in _ELEMENTWISE:
            return Activation(key, _ELEMENTWISE[key])
        raise ValueError(
            f"{argname}: unknown activation {spec!r}; expected None, a callable or one of "
            f"{', '.join(ACTIVATION_NAMES)}"
        )
    if callable(spec):
        return Activation(getattr(spec, "__name__", type(spec).__name__), spec)
    raise ValueError(
        f"{argname}: expected None, an activation name or a callable, got {type(spec).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Regularizers (Keras 2: penalty = l1 * sum|w| + l2 * sum w^2, default factor 0.01)
# ---------------------------------------------------------------------------------------------

RegularizerSpec = Union[str, Mapping[str, float], Callable[[Tensor], Tensor], None]
Regularizer = Callable[[Tensor], Tensor]

_KERAS_DEFAULT_FACTOR = 0.01
REGULARIZER_NAMES = ("l1", "l2", "l1_l2")


@dataclass(frozen=True)
class L1L2:
    """``l1 * sum(|w|) + l2 * sum(w ** 2)``, Keras' ``L1L2`` regularizer."""

    l1: float = 0.0
    l2: float = 0.0

    def __call__(self, w: Tensor) -> Tensor:
        penalty = w.new_zeros(())
        if self.l1:
            penalty = penalty + self.l1 * w.abs().sum()
        if self.l2:
            penalty = penalty + self.l2 * w.square().sum()
        return penalty


def resolve_regularizer(spec: RegularizerSpec, argname: str) -> Regularizer | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        key = spec.lower()
        if key == "l1":
            return L1L2(l1=_KERAS_DEFAULT_FACTOR)
        if key == "l2":
            return L1L2(l2=_KERAS_DEFAULT_FACTOR)
        if key == "l1_l2":
            return L1L2(l1=_KERAS_DEFAULT_FACTOR, l2=_KERAS_DEFAULT_FACTOR)
        raise ValueError(
            f"{argname}: unknown regularizer {spec!r}; expected one of {', '.join(REGULARIZER_NAMES)}, "
            "a dict like {'l1': 0.0, 'l2': 1e-4}, or a callable"
        )
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"l1", "l2"}
        if unknown:
            raise ValueError(
                f"{argname}: unknown regularizer keys {sorted(unknown)}; expected only 'l1' and 'l2'"
            )
        values = {k: float(v) for k, v in spec.items()}
        if any(v < 0 or not math.isfinite(v) for v in values.values()):
            raise ValueError(f"{argname}: regularizer factors must be finite and >= 0, got {values}")
        return L1L2(**values)
    if callable(spec):
        return spec
    raise ValueError(
        f"{argname}: expected None, a regularizer name, a dict or a callable, got {type(spec).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Constraints (Keras 2 semantics; projections applied in place by apply_constraints())
# ---------------------------------------------------------------------------------------------

Axis = Union[int, Sequence[int], None]
ConstraintSpec = Union[str, Mapping[str, Any], Callable[[Tensor], Tensor], None]
_EPS = 1e-7  # Keras' K.epsilon()


def _norms(w: Tensor, axis: tuple[int, ...]) -> Tensor:
    return w.square().sum(dim=axis, keepdim=True).sqrt()


@dataclass(frozen=True)
class MaxNorm:
    max_value: float = 2.0
    axis: Axis = None

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        norms = _norms(w, _axes(self.axis, default_axis, w))
        return w * (norms.clamp(0.0, self.max_value) / (_EPS + norms))


@dataclass(frozen=True)
class NonNeg:
    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        return w * (w >= 0).to(w.dtype)


@dataclass(frozen=True)
class UnitNorm:
    axis: Axis = None

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        return w / (_EPS + _norms(w, _axes(self.axis, default_axis, w)))


@dataclass(frozen=True)
class MinMaxNorm:
    min_value: float = 0.0
    max_value: float = 1.0
    rate: float = 1.0
    axis: Axis = None

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        norms = _norms(w, _axes(self.axis, default_axis, w))
        desired = self.rate * norms.clamp(self.min_value, self.max_value) + (1 - self.rate) * norms
        return w * (desired / (_EPS + norms))


@dataclass(frozen=True)
class CallableConstraint:
    fn: Callable[[Tensor], Tensor]

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        return self.fn(w)


Constraint = Union[MaxNorm, NonNeg, UnitNorm, MinMaxNorm, CallableConstraint]
_CONSTRAINTS: dict[str, type] = {
    "max_norm": MaxNorm,
    "non_neg": NonNeg,
    "unit_norm": UnitNorm,
    "min_max_norm": MinMaxNorm,
}


def _axes(axis: Axis, default: tuple[int, ...], w: Tensor) -> tuple[int, ...]:
    if axis is None:
        return default
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -w.dim() <= a < w.dim():
            raise ValueError(
                f"constraint axis {a} is out of range for a weight of shape {tuple(w.shape)}"
            )
    return axes


def resolve_constraint(spec: ConstraintSpec, argname: str) -> Constraint | None:
    """``"max_norm"``, ``{"name": "max_norm", "max_value": 3}``, a callable, or None.

    ``axis`` (optional) indexes OUR parameter layout; by default each parameter is normalised over
    its fan-in axes (see the layers' ``_constraint_axes``).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = str(kwargs.pop("name", "")).lower()
        if name not in _CONSTRAINTS:
            raise ValueError(
                f"{argname}: unknown constraint {name or spec!r}; expected one of "
                f"{', '.join(_CONSTRAINTS)} (as a name or a dict with 'name'), or a callable"
            )
        cls = _CONSTRAINTS[name]
        try:
            return cls(**kwargs)
        except TypeError as err:
            fields = ", ".join(cls.__dataclass_fields__) or "none"
            raise ValueError(
                f"{argname}: bad arguments {kwargs} for constraint {name!r}; it takes: {fields}"
            ) from err
    if callable(spec):
        return CallableConstraint(spec)
    raise ValueError(
        f"{argname}: expected None, a constraint name, a dict or a callable, got {type(spec).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Bias initializers
# ---------------------------------------------------------------------------------------------

InitializerSpec = Union[str, Mapping[str, Any], float, Callable[[Tensor], Any]]
INITIALIZER_NAMES = ("zeros", "ones", "constant", "random_uniform", "random_normal")


def resolve_initializer(spec: InitializerSpec, argname: str) -> Callable[[Tensor], None]:
    """Return an in-place initializer. Names follow Keras (``random_uniform`` is U(-0.05, 0.05),
    ``random_normal`` is N(0, 0.05^2)); dicts pass arguments, e.g. ``{"name": "constant", "value": 0.1}``;
    a number means ``constant``; a callable is called on the tensor under ``torch.no_grad()``."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = float(spec)
        return lambda t: t.fill_(value)
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = str(kwargs.pop("name", "")).lower()
        try:
            if name == "zeros":
                return lambda t: t.zero_()
            if name == "ones":
                return lambda t: t.fill_(1.0)
            if name == "constant":
                value = float(kwargs.pop("value", 0.0))
                return lambda t: t.fill_(value)
            if name == "random_uniform":
                lo, hi = float(kwargs.pop("minval", -0.05)), float(kwargs.pop("maxval", 0.05))
                return lambda t: t.uniform_(lo, hi)
            if name == "random_normal":
                mean, std = float(kwargs.pop("mean", 0.0)), float(kwargs.pop("stddev", 0.05))
                return lambda t: t.normal_(mean, std)
        finally:
            if name in INITIALIZER_NAMES and kwargs:
                raise ValueError(f"{argname}: unexpected arguments {sorted(kwargs)} for {name!r}")
        raise ValueError(
            f"{argname}: unknown initializer {name or spec!r}; expected a number, a callable or one "
            f"of {', '.join(INITIALIZER_NAMES)}"
        )
    if callable(spec):
        return spec
    raise ValueError(
        f"{argname}: expected an initializer name, dict, number or callable, got {type(spec).__name__}"
    )
