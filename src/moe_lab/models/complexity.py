"""Model size and cost: trainable parameters and forward FLOPs per example."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs of ONE example ``(1, *input_shape)`` in eval mode, as counted by
    :class:`torch.utils.flop_counter.FlopCounterMode`.

    Its convention: 2 FLOPs per multiply-add of matmuls and convolutions (``mm``, ``addmm``,
    ``bmm``, ``convolution``...); biases, activations, pooling, softmax and other elementwise ops
    are not counted.

    Runs on the model's device and dtype (a ``meta``-device model works and allocates nothing);
    the model's train/eval mode is restored afterwards.

    Args:
        model: any module taking one tensor ``(B, *input_shape)``.
        input_shape: one example's shape, without the batch dim, e.g. ``(3, 32, 32)``.
    """
    try:
        shape = tuple(int(n) for n in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros(1, *shape, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
