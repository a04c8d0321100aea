"""Lightning modules, optimisers and callbacks."""

from .callbacks import AtomicCheckpointIO, DivergedError, DivergenceMonitor, EpochSeeder
from .classifier import Classifier
from .optim import InverseTimeDecay, keras_decay
from .temperature import GateTemperatureSchedule

__all__ = [
    "AtomicCheckpointIO",
    "Classifier",
    "DivergedError",
    "DivergenceMonitor",
    "EpochSeeder",
    "GateTemperatureSchedule",
    "InverseTimeDecay",
    "keras_decay",
]
