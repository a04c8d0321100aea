"""How the layers take their keywords.

- :func:`takes_keywords_of`: the MoE options are declared once, as :class:`~moe_lab.layers.MoEBase`'s
  keyword-only parameters. A layer's ``__init__`` takes them as ``**options`` and passes them on;
  this decorator shows them in its signature (``help()``, ``inspect.signature``), so every layer
  lists every option and a new option is added in one place.
- :func:`rejects_original_keywords`: a keyword of the original Keras layers raises a TypeError
  naming the torch-style keyword to use.

Imports the standard library only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

#: The original Keras layers' keyword names and the torch-style keyword that replaces each.
ORIGINAL_KEYWORDS: dict[str, str] = {
    "n_filters": "out_channels",
    "n_experts_per_filter": "n_experts",
    "units": "out_features",
    "strides": "stride",
    "dilation_rate": "dilation",
    "input_dim": "in_features / in_channels",
    "input_shape": "input_size (spatial only; channels are in_channels)",
    "rank": "the class: Conv1dMoE, Conv2dMoE or Conv3dMoE",
}

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def takes_keywords_of(
    target: Callable[..., Any], *, exclude: Iterable[str] = ()
) -> Callable[[_Fn], _Fn]:
    """Decorate a function whose last parameter is ``**options``, passed on to ``target``: its
    signature (as ``help()`` and ``inspect.signature`` show it) lists ``target``'s keyword-only
    parameters, less ``exclude``, in place of ``**options``, with their defaults.

    A call gets ``options`` complete: every one of those keywords, the caller's value or
    ``target``'s default. A keyword that is neither the function's own nor ``target``'s raises
    Python's TypeError (``f() got an unexpected keyword argument 'x'``), naming the function.
    """
    excluded = set(exclude)
    passed_on = [
        param
        for param in inspect.signature(target).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and param.name not in excluded
    ]
    defaults = {param.name: param.default for param in passed_on}
    source = getattr(target, "__qualname__", repr(target))

    def decorate(fn: _Fn) -> _Fn:
        *own, rest = inspect.signature(fn).parameters.values()
        if rest.kind is not inspect.Parameter.VAR_KEYWORD:
            raise TypeError(
                f"{fn.__qualname__} must end with **options to take {source}'s keywords"
            )
        clash = sorted(defaults.keys() & {param.name for param in own})
        if clash:
            raise TypeError(f"{fn.__qualname__} and {source} both declare {clash}")
        signature = inspect.signature(fn).replace(parameters=[*own, *passed_on])
        accepted = frozenset(signature.parameters)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            unknown = next((name for name in kwargs if name not in accepted), None)
            if unknown is not None:
                raise TypeError(
                    f"{fn.__qualname__}() got an unexpected keyword argument {unknown!r}"
                )
            return fn(*args, **{**defaults, **kwargs})

        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def rejects_original_keywords(init: _Fn) -> _Fn:
    """Wrap a layer's ``__init__`` so that a keyword of the original Keras layers raises a
    TypeError naming the torch-style keyword to use, instead of Python's bare "unexpected keyword
    argument". ``help()`` and ``inspect.signature`` still show ``init``'s signature."""

    @functools.wraps(init)
    def wrapper(self: object, *args: Any, **kwargs: Any) -> None:
        used = [name for name in kwargs if name in ORIGINAL_KEYWORDS]
        if used:
            renames = "; ".join(f"{name!r} -> {ORIGINAL_KEYWORDS[name]}" for name in used)
            raise TypeError(
                f"{type(self).__name__} takes torch-style keywords, not the original Keras "
                f"layer's: {renames} (to port trained weights, see "
                "moe_lab.layers.load_keras_weights)"
            )
        init(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
