"""Keras-style options of the MoE layers: activations, regularizers, constraints and bias
initializers, each given by name, by dict or as a callable.

Everything resolves at construction time, so a typo fails in the layer constructor with the list of
valid names, never deep inside the first forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import finite_number


def _named(
    spec: str | Mapping[str, Any],
    known: Mapping[str, object],
    argname: str,
    what: str,
    expected: str,
) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``{"name": ..., **arguments}`` -> the lowercased name and the arguments; a
    ValueError saying what was ``expected`` when the name is not in ``known``."""
    kwargs = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = str(kwargs.pop("name", "")).lower()
    if name not in known:
        shown = name or ({"name": spec} if isinstance(spec, str) else dict(spec))
        raise ValueError(f"{argname}: unknown {what} {shown!r}; expected {expected}")
    return name, kwargs


def _check_arguments(
    kwargs: Mapping[str, Any], allowed: tuple[str, ...], argname: str, what: str, name: str
) -> None:
    unexpected = sorted(set(kwargs) - set(allowed))
    if unexpected:
        raise ValueError(
            f"{argname}: unexpected arguments {unexpected} for {what} {name!r}; it takes: "
            f"{', '.join(allowed) or 'no arguments'}"
        )


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

# An activation receives the tensor and the index of its experts axis. Only softmax uses the axis:
# as in the original (Keras softmax over the last axis, which is the experts axis there) it normalises
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

ActivationSpec = str | Callable[[Tensor], Tensor] | None


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
    if spec is None:
        return Activation("linear", None)
    if isinstance(spec, str):
        key = spec.lower()
        if key == "linear":
            return Activation("linear", None)
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

RegularizerSpec = str | Mapping[str, float] | Callable[[Tensor], Tensor] | None
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
        values = {k: finite_number(v, f"{argname}: factor {k!r}") for k, v in spec.items()}
        if any(v < 0 for v in values.values()):
            raise ValueError(f"{argname}: regularizer factors must be >= 0, got {values}")
        return L1L2(**values)
    if callable(spec):
        return spec
    raise ValueError(
        f"{argname}: expected None, a regularizer name, a dict or a callable, got {type(spec).__name__}"
    )


def scalar_penalty(value: object, argname: str) -> Tensor:
    """``value``, checked to be what a regularizer must return: a scalar tensor."""
    if not isinstance(value, Tensor) or value.dim() != 0:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{argname} must return a scalar tensor, got {got}")
    return value


# ---------------------------------------------------------------------------------------------
# Constraints (Keras 2 semantics; projections applied in place by apply_constraints())
# ---------------------------------------------------------------------------------------------

Axis = int | Sequence[int] | None
ConstraintSpec = str | Mapping[str, Any] | Callable[[Tensor], Tensor] | None
_EPS = 1e-7  # Keras' K.epsilon()


def _norms(w: Tensor, axis: tuple[int, ...]) -> Tensor:
    """L2 norms over ``axis``; no axes means each element on its own (its absolute value), as
    Keras' norm over a singleton axis (torch would read an empty ``dim`` as every axis)."""
    if not axis:
        return w.abs()
    return w.square().sum(dim=axis, keepdim=True).sqrt()


@dataclass(frozen=True)
class MaxNorm:
    """Keras ``MaxNorm``: ``w * clip(n, 0, max_value) / (eps + n)``, n the L2 norms over ``axis``."""

    max_value: float = 2.0
    axis: Axis = None

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        norms = _norms(w, _axes(self.axis, default_axis))
        return w * (norms.clamp(0.0, self.max_value) / (_EPS + norms))


@dataclass(frozen=True)
class NonNeg:
    """Keras ``NonNeg``: negative entries set to zero."""

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        return w * (w >= 0).to(w.dtype)


@dataclass(frozen=True)
class UnitNorm:
    """Keras ``UnitNorm``: ``w / (eps + n)``, n the L2 norms over ``axis``."""

    axis: Axis = None

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        return w / (_EPS + _norms(w, _axes(self.axis, default_axis)))


@dataclass(frozen=True)
class MinMaxNorm:
    """Keras ``MinMaxNorm``: ``w * (rate * clip(n, min, max) + (1 - rate) * n) / (eps + n)``."""

    min_value: float = 0.0
    max_value: float = 1.0
    rate: float = 1.0
    axis: Axis = None

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        norms = _norms(w, _axes(self.axis, default_axis))
        desired = self.rate * norms.clamp(self.min_value, self.max_value) + (1 - self.rate) * norms
        return w * (desired / (_EPS + norms))


@dataclass(frozen=True)
class CallableConstraint:
    """A user function ``fn(w) -> projected w`` (same shape)."""

    fn: Callable[[Tensor], Tensor]

    def __call__(self, w: Tensor, default_axis: tuple[int, ...]) -> Tensor:
        return self.fn(w)


Constraint = MaxNorm | NonNeg | UnitNorm | MinMaxNorm | CallableConstraint
_CONSTRAINTS: dict[str, type] = {
    "max_norm": MaxNorm,
    "non_neg": NonNeg,
    "unit_norm": UnitNorm,
    "min_max_norm": MinMaxNorm,
}


def _check_axis(axis: object, what: str) -> int | tuple[int, ...] | None:
    """None, an int or a non-empty sequence of distinct ints (checked against ranks later)."""
    if axis is None:
        return None
    if isinstance(axis, int) and not isinstance(axis, bool):
        return axis
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        axes = tuple(axis)
        if (
            axes
            and all(isinstance(a, int) and not isinstance(a, bool) for a in axes)
            and len(set(axes)) == len(axes)
        ):
            return axes
    raise ValueError(f"{what} must be None, an int or a sequence of distinct ints, got {axis!r}")


def check_constraint_axes(constraint: object, shape: Sequence[int], what: str) -> None:
    """Raise if an explicit ``axis`` does not index a weight of ``shape`` (called at construction)."""
    axis = getattr(constraint, "axis", None)
    if axis is None:
        return
    rank = len(shape)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    bad = [a for a in axes if not -rank <= a < rank]
    if bad or len({a % rank for a in axes}) != len(axes):
        raise ValueError(
            f"{what}: axis {axis!r} does not fit a weight of shape {tuple(shape)}; expected "
            f"distinct axes in [{-rank}, {rank - 1}]"
        )


def _axes(axis: Axis, default: tuple[int, ...]) -> tuple[int, ...]:
    if axis is None:
        return default
    return (axis,) if isinstance(axis, int) else tuple(axis)


def resolve_constraint(spec: ConstraintSpec, argname: str) -> Constraint | None:
    """``"max_norm"``, ``{"name": "max_norm", "max_value": 3}``, a callable, or None.

    ``axis`` (optional) indexes OUR parameter layout; by default each parameter is normalised over
    its fan-in axes (see the layers' ``_constraint_axes``).
    """
    if spec is None:
        return None
    if isinstance(spec, (str, Mapping)):
        expected = (
            f"one of {', '.join(_CONSTRAINTS)} (as a name or a dict with 'name'), or a callable"
        )
        name, kwargs = _named(spec, _CONSTRAINTS, argname, "constraint", expected)
        cls = _CONSTRAINTS[name]
        _check_arguments(kwargs, tuple(cls.__dataclass_fields__), argname, "constraint", name)
        for key, value in kwargs.items():
            if key == "axis":
                kwargs[key] = _check_axis(value, f"{argname}: axis")
            else:
                kwargs[key] = finite_number(value, f"{argname}: {name} argument {key!r}")
        constraint = cls(**kwargs)
        if isinstance(constraint, MinMaxNorm) and not (
            0 <= constraint.min_value <= constraint.max_value
        ):
            raise ValueError(
                f"{argname}: min_max_norm needs 0 <= min_value <= max_value, got "
                f"min_value={constraint.min_value}, max_value={constraint.max_value}"
            )
        if isinstance(constraint, MaxNorm) and constraint.max_value < 0:
            raise ValueError(
                f"{argname}: max_norm needs max_value >= 0, got {constraint.max_value}"
            )
        return constraint
    if callable(spec):
        return CallableConstraint(spec)
    raise ValueError(
        f"{argname}: expected None, a constraint name, a dict or a callable, got {type(spec).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Bias initializers
# ---------------------------------------------------------------------------------------------

InitializerSpec = str | Mapping[str, Any] | float | Callable[[Tensor], Any]
Initializer = Callable[[Tensor], Any]


@dataclass(frozen=True)
class Constant:
    """Fill with ``value`` (Keras ``zeros``, ``ones``, ``constant``)."""

    value: float = 0.0

    def __call__(self, t: Tensor) -> Tensor:
        return t.fill_(self.value)


@dataclass(frozen=True)
class RandomUniform:
    """``U(minval, maxval)``, Keras ``random_uniform`` (defaults -0.05, 0.05)."""

    minval: float = -0.05
    maxval: float = 0.05

    def __call__(self, t: Tensor) -> Tensor:
        return t.uniform_(self.minval, self.maxval)


@dataclass(frozen=True)
class RandomNormal:
    """``N(mean, stddev^2)``, Keras ``random_normal`` (defaults 0, 0.05)."""

    mean: float = 0.0
    stddev: float = 0.05

    def __call__(self, t: Tensor) -> Tensor:
        return t.normal_(self.mean, self.stddev)


# name -> (class, fixed arguments, arguments the user may pass)
_INITIALIZERS: dict[str, tuple[type, dict[str, float], tuple[str, ...]]] = {
    "zeros": (Constant, {"value": 0.0}, ()),
    "ones": (Constant, {"value": 1.0}, ()),
    "constant": (Constant, {}, ("value",)),
    "random_uniform": (RandomUniform, {}, ("minval", "maxval")),
    "random_normal": (RandomNormal, {}, ("mean", "stddev")),
}
INITIALIZER_NAMES = tuple(_INITIALIZERS)


def resolve_initializer(spec: InitializerSpec, argname: str) -> Initializer:
    """Return an in-place initializer (called on the tensor under ``torch.no_grad()``).

    - a number: ``constant`` with that value;
    - a name from :data:`INITIALIZER_NAMES` (Keras': ``random_uniform`` is U(-0.05, 0.05),
      ``random_normal`` is N(0, 0.05^2));
    - a dict with ``name`` and arguments, e.g. ``{"name": "constant", "value": 0.1}``;
    - a callable ``fn(tensor)`` that fills the tensor in place.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(finite_number(spec, argname))
    if isinstance(spec, (str, Mapping)):
        expected = (
            f"a number, a callable, or one of {', '.join(INITIALIZER_NAMES)} (as a name or a dict "
            "with 'name')"
        )
        name, kwargs = _named(spec, _INITIALIZERS, argname, "initializer", expected)
        cls, fixed, allowed = _INITIALIZERS[name]
        _check_arguments(kwargs, allowed, argname, "initializer", name)
        values = {
            k: finite_number(v, f"{argname}: {name} argument {k!r}") for k, v in kwargs.items()
        }
        init = cls(**fixed, **values)
        if isinstance(init, RandomUniform) and init.minval > init.maxval:
            raise ValueError(
                f"{argname}: random_uniform needs minval <= maxval, got {init.minval} > {init.maxval}"
            )
        if isinstance(init, RandomNormal) and init.stddev < 0:
            raise ValueError(f"{argname}: random_normal needs stddev >= 0, got {init.stddev}")
        return init
    if callable(spec):
        return spec
    raise ValueError(
        f"{argname}: expected an initializer name, dict, number or callable, got {type(spec).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Per weight
# ---------------------------------------------------------------------------------------------

_Resolved = TypeVar("_Resolved")


def resolve_per_weight(
    resolve: Callable[[Any, str], _Resolved],
    kind: str,
    keywords: Mapping[str, Any],
    weights: Sequence[str],
) -> dict[str, _Resolved]:
    """``{weight: resolved}`` for each of ``weights``, from its keyword ``f"{weight}_{kind}"`` in
    ``keywords`` (e.g. ``expert_kernel_regularizer`` for ``kind="regularizer"``), resolved by
    ``resolve(spec, keyword)`` in the order of ``weights``."""
    return {weight: resolve(keywords[f"{weight}_{kind}"], f"{weight}_{kind}") for weight in weights}
