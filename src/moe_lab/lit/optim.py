"""Optimisers and schedules that the configs name, beyond torch's own."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class InverseTimeDecay:
    """Keras' per-update decay: ``lr_t = lr / (1 + decay * t)``, t = updates done so far.

    A class rather than a lambda so that LambdaLR can checkpoint it."""

    def __init__(self, decay: float) -> None:
        if decay < 0:
            raise ValueError(f"decay must be >= 0, got {decay}")
        self.decay = float(decay)

    def __call__(self, step: int) -> float:
        return 1.0 / (1.0 + self.decay * step)


def keras_decay(optimizer: Optimizer, decay: float = 1e-6) -> LambdaLR:
    """The schedule behind Keras' ``RMSprop(lr, decay=...)``; step it once per update."""
    return LambdaLR(optimizer, InverseTimeDecay(decay))
