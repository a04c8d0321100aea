"""Lightning modules, optimisers and callbacks."""

from .callbacks import AtomicCheckpointIO, DivergedError, DivergenceMonitor
from .classifier import Classifier
from .optim import InverseTimeDecay, keras_decay

__all__ = [
    "AtomicCheckpointIO",
    "Classifier",
    "DivergedError",
    "DivergenceMonitor",
    "InverseTimeDecay",
    "keras_decay",
]
