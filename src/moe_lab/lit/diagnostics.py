"""Why a model fits or does not, measured as it trains: each layer's activation scale (the
standard deviation of its output on the validation set) at initialisation and after every
epoch, and each MoE layer's expert similarity (:func:`moe_lab.layers.diagnostics.expert_similarity`).

A mixture that softmax-averages K independent experts starts with an output about √K smaller
than one expert's; this is where that shows, layer by layer, beside the CNN twin's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moe_lab.layers import MoEBase
from moe_lab.run.record import act_column

#: The layers whose output scale is measured: every convolution, dense layer and MoE layer.
_MEASURED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, MoEBase)


def measured_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of the model's compute layers (none inside an MoE layer)."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _MEASURED) and not any(name.startswith(f"{m}.") for m in layers):
            layers[name] = module
    return layers


class ActivationScales:
    """Sums each measured layer's output std over the batches it sees while :meth:`recording`."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = measured_layers(model)
        self._sums: dict[str, Tensor] = {}
        self._batches = 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        def hook(name: str) -> Any:
            def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
                std = output.detach().float().std()
                self._sums[name] = std if name not in self._sums else self._sums[name] + std

            return record

        handles = [layer.register_forward_hook(hook(name)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def count_batch(self) -> None:
        self._batches += 1

    def collect(self, kind: str = "std") -> dict[str, float]:
        """``{act/<layer>/<kind>: mean std over the batches}``, and a fresh start."""
        if not self._batches:
            return {}
        out = {act_column(name, kind): float(s) / self._batches for name, s in self._sums.items()}
        self._sums, self._batches = {}, 0
        return out


def scales_at_init(model: nn.Module, batch: Any, scales: ActivationScales) -> dict[str, float]:
    """Each layer's output std on one validation batch, in eval mode, before any training step;
    every RNG's state is restored after, so the run trains exactly as it would without it."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), scales.recording():
            model(batch[0])
            scales.count_batch()
        return scales.collect("std_init")
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


__all__ = ["ActivationScales", "measured_layers", "scales_at_init"]
