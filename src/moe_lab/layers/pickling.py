"""Pickling and copying the layers: what the last forward kept is left out."""

from __future__ import annotations

from typing import Any


class DropsForwardState:
    """Mixin for an ``nn.Module`` that keeps tensors of its last forward in the attributes named
    by ``_forward_state``: pickling and ``copy.deepcopy`` save those attributes as None."""

    #: attributes holding tensors of the last forward
    _forward_state: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        # The tensors of the last forward belong to that forward's autograd graph: pickling or
        # deep-copying them fails (non-leaf tensors) and would drag the graph along.
        state = super().__getstate__()  # type: ignore[misc]
        for name in self._forward_state:
            state[name] = None
        return state
