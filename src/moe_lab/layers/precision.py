"""The layers' dtype and autocast policy: which dtype the gate and the experts compute in, and
which inputs a layer accepts.

- The gate (logits, softmax, top-k) runs in float32, or float64 for float64 layers, also under
  autocast.
- The experts compute (and their outputs are mixed) in the autocast dtype under autocast, for
  non-float64 weights as autocast does, else in the weights' dtype.
- Outside autocast an input must have the weights' dtype (no silent casts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routing import autocast_enabled


def gate_dtype(x: Tensor, gating_kernel: Tensor) -> torch.dtype:
    """float32, or float64 when the input or the gating kernel is float64."""
    if torch.float64 in (x.dtype, gating_kernel.dtype):
        return torch.float64
    return torch.float32


def mix_dtype(x: Tensor, expert_kernel: Tensor) -> torch.dtype:
    """The dtype the experts compute (and their outputs are mixed) in: the autocast dtype under
    autocast (for non-float64 weights, as autocast does), else the weights' dtype."""
    device = x.device.type
    dtype = expert_kernel.dtype
    if autocast_enabled(device) and dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return dtype


def check_input_dtype(layer: str, x: Tensor, expert_kernel: Tensor) -> None:
    """ValueError, naming the ``layer`` class, for an input that is not floating point, or not of
    the weights' dtype outside autocast."""
    if not x.is_floating_point():
        raise ValueError(f"{layer} expected a floating-point input, got dtype {x.dtype}")
    dtype = expert_kernel.dtype
    if x.dtype != dtype and not autocast_enabled(x.device.type):
        raise ValueError(
            f"{layer} has {dtype} weights but got a {x.dtype} input; convert one "
            f"of them (layer.to({dtype}) or x.to({dtype})) or run under torch.autocast"
        )
