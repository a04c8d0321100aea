"""The gate temperature schedule (DynamicConv's annealing, ``experts.gate_temperature_schedule``):
a callback that sets ``gate_temperature`` on every MoE layer at the start of each training epoch
and records the value in the epoch's row (``metrics.csv``'s ``gate_temperature`` column and every
logger)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from moe_lab.layers import MoEBase
from moe_lab.run.record import GATE_TEMPERATURE_COLUMN


def scheduled_temperature(
    epoch: int, start: float, end: float, epochs: int, max_epochs: int | None = None
) -> float:
    """tau of training epoch ``epoch`` (from 0): linear from ``start`` at epoch 0 to ``end`` at
    epoch ``n - 1``, then ``end``, where ``n = min(epochs, max_epochs)``: a run with fewer epochs
    than the schedule anneals over all of them, so its last epoch trains (and is validated) at
    ``end``. ``n == 1``: ``end`` throughout."""
    n = epochs if max_epochs is None or max_epochs < 1 else min(epochs, max_epochs)
    if n <= 1:
        return float(end)
    return start + (end - start) * min(epoch, n - 1) / (n - 1)


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"GateTemperatureSchedule: {name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"GateTemperatureSchedule: {name} must be finite, got {value!r}")
    return float(value)


class GateTemperatureSchedule(L.Callback):
    """Anneals the gates' temperature: at the start of each training epoch every MoE layer of
    the module gets ``gate_temperature = scheduled_temperature(epoch, ...)`` (see there), and the
    value joins the epoch's row as ``gate_temperature`` (through the module's ``epoch_values``,
    which :class:`~moe_lab.lit.Classifier` writes to ``metrics.csv`` and logs to every logger).

    Validation in an epoch uses that epoch's temperature, and checkpoints keep the layers' value
    (the Classifier saves it), so a tested checkpoint is scored at the temperature it was
    validated with. A module without MoE layers (a plain CNN) is left alone, and gets no column.

    Args:
        start: tau at epoch 0 (DynamicConv: 30).
        end: tau from epoch ``min(epochs, max_epochs) - 1`` on (DynamicConv: 1).
        epochs: the annealing's length in epochs (DynamicConv: 10).
    """

    def __init__(self, start: float, end: float, epochs: int) -> None:
        self.start = _positive(start, "start")
        self.end = _positive(end, "end")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(
                f"GateTemperatureSchedule: epochs must be a positive integer, got {epochs!r}"
            )
        self.epochs = epochs

    def temperature(self, epoch: int, max_epochs: int | None = None) -> float:
        return scheduled_temperature(epoch, self.start, self.end, self.epochs, max_epochs)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = [m for m in pl_module.modules() if isinstance(m, MoEBase)]
        if not layers:
            return
        tau = self.temperature(trainer.current_epoch, trainer.max_epochs)
        for layer in layers:
            layer.gate_temperature = tau
        values = getattr(pl_module, "epoch_values", None)
        if isinstance(values, dict):
            values[GATE_TEMPERATURE_COLUMN] = tau
        else:  # another LightningModule: straight to its loggers
            pl_module.log(GATE_TEMPERATURE_COLUMN, tau, on_step=False, on_epoch=True)

    def __repr__(self) -> str:
        return (
            f"GateTemperatureSchedule(start={self.start:g}, end={self.end:g}, epochs={self.epochs})"
        )
