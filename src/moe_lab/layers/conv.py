"""Convolutional mixtures of experts in 1D, 2D and 3D (the seed's ``Conv{1,2,3}DMoE``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MoEBase, check_positive_int
from .padding import PaddingSpec, as_tuple, check_padding, output_size, pad_amounts

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _ConvNdMoE(MoEBase):
    r"""Each of ``out_channels`` filters mixes ``n_experts`` convolution kernels with its own gate:

    .. math::
        y[b, f, p] = \sum_k g(z)[b, f, k]\, f_{act}(\mathrm{conv}_{f,k}(x)[b, p] + c[f, k]),\quad
        z[b, f, k] = \sum_{c, s} x[b, c, s] V[c, s, f, k] + d[f, k]

    The gate of a filter is one number per sample and expert, computed by a dense map from the
    whole input volume; it is shared by every output position. That ties the layer to one
    ``input_size``.

    The experts are ONE convolution with ``out_channels * n_experts`` output channels (channel
    ``f * K + k`` is expert k of filter f); the gate is ONE matmul.

    Args:
        in_channels: input channels C.
        out_channels: output filters (the seed's ``n_filters``).
        n_experts: experts per filter K (the seed's ``n_experts_per_filter``).
        kernel_size, stride, dilation: int or one int per spatial dim.
        input_size: the spatial size of the input (no channels), one int per spatial dim.
        padding: ``"valid"``, ``"same"``, ``"causal"`` (1D only) with Keras' output lengths, or
            ints (symmetric zero padding, as ``nn.Conv``).
        **kwargs: the seed's keywords (see :class:`~moe_lab.layers.base.MoEBase`).

    Shape:
        input ``(B, C, *input_size)`` (channels first; channels_last memory format works) ->
        output ``(B, out_channels, *output_size)``.

    Parameters:
        ``expert_kernel (out*K, C, *kernel_size)``, ``gating_kernel (C, *input_size, out, K)``,
        ``expert_bias (out, K)`` or None, ``gating_bias (out, K)`` or None.
    """

    ndim: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_experts: int,
        kernel_size: int | Sequence[int],
        input_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: PaddingSpec = "valid",
        dilation: int | Sequence[int] = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(n_experts, **kwargs)
        d = self.ndim
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.kernel_size = as_tuple(kernel_size, d, "kernel_size")
        self.stride = as_tuple(stride, d, "stride")
        self.dilation = as_tuple(dilation, d, "dilation")
        self.input_size = as_tuple(input_size, d, "input_size")
        self.padding = check_padding(padding, d)
        self._pads = pad_amounts(
            self.padding, self.input_size, self.kernel_size, self.stride, self.dilation
        )
        self.output_size = output_size(
            self.input_size, self._pads, self.kernel_size, self.stride, self.dilation
        )
        if any(n < 1 for n in self.output_size):
            raise ValueError(
                f"input_size {self.input_size} is too small for kernel_size {self.kernel_size} "
                f"with dilation {self.dilation} and padding {self.padding!r} (output size would be "
                f"{self.output_size}); use a larger input, a smaller kernel or padding='same'"
            )
        # Symmetric amounts go to the convolution itself; Keras' odd 'same' totals and causal
        # padding need an explicit pad first.
        self._symmetric = all(before == after for before, after in self._pads)

        k, out = self.n_experts, self.out_channels
        self.expert_kernel = nn.Parameter(torch.empty(out * k, in_channels, *self.kernel_size))
        self.gating_kernel = nn.Parameter(torch.empty(in_channels, *self.input_size, out, k))
        self._finish_init(expert_bias_shape=(out, k), gating_bias_shape=(out, k))

    def reset_parameters(self) -> None:
        """The seed's init: normal kernels, std ``s / sqrt(fan_in)``, with the gate's fan-in the
        whole input volume."""
        fan_expert = self.in_channels * math.prod(self.kernel_size)
        fan_gating = self.in_channels * math.prod(self.input_size)
        std_expert = self.expert_kernel_initializer_scale / math.sqrt(fan_expert)
        std_gating = self.gating_kernel_initializer_scale / math.sqrt(fan_gating)
        with torch.no_grad():
            self.expert_kernel.normal_(0.0, std_expert)
            self.gating_kernel.normal_(0.0, std_gating)
        self._reset_biases()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> _ConvNdMoE:
        # module.to(memory_format=torch.channels_last) converts every rank-4/5 tensor. The gating
        # kernel (C, *input_size, out, K) is rank 4 (1D layer) or 5 (2D layer) without being an
        # image, and converting it either fails (rank 5 + channels_last) or silently makes it
        # non-contiguous. Hand it to fn as a 2D view, so dtype/device changes still apply but no
        # memory format does; the expert kernel is converted like nn.Conv's weight.
        gating_shape = self.gating_kernel.shape

        def keep_gating_layout(t: Tensor) -> Tensor:
            if t.shape != gating_shape:
                return fn(t)
            flat = t.reshape(gating_shape[0], -1)
            flat_applied = fn(flat)
            return t if flat_applied is flat else flat_applied.view(gating_shape)

        return super()._apply(keep_gating_layout, recurse)

    def _constraint_axes(self, name: str) -> tuple[int, ...]:
        if name == "expert_kernel":
            return tuple(range(1, self.ndim + 2))  # (C, *kernel_size) of each output channel
        if name == "gating_kernel":
            return tuple(range(self.ndim + 1))  # (C, *input_size): the whole input volume
        return (0,)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, *self.input_size)
        if x.dim() != self.ndim + 2:
            raise ValueError(
                f"{type(self).__name__} expected a {self.ndim + 2}D input (B, {', '.join(map(str, expected))}), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expected {self.in_channels} input channels (dim 1, channels "
                f"first), got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expected spatial size {self.input_size}, got "
                f"{tuple(x.shape[2:])}: the gate reads the whole input volume, so the layer is "
                f"tied to input_size; build it with input_size={tuple(x.shape[2:])}"
            )
        self._check_dtype(x)

    def _expert_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self._symmetric:
            padding = tuple(before for before, _ in self._pads)
        else:
            # F.pad lists dims last-first
            x = F.pad(x, [p for pair in reversed(self._pads) for p in pair])
            padding = (0,) * self.ndim
        return _CONV[self.ndim](x, weight, bias, self.stride, padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, *input_size) -> (B, out_channels, *output_size)``; a channels_last
        input gives a channels_last output, as nn.Conv does."""
        self._check_input(x)
        batch, k, out = x.shape[0], self.n_experts, self.out_channels
        bias = None if self.expert_bias is None else self.expert_bias.reshape(-1)
        hidden = self._expert_conv(x, self.expert_kernel, bias)  # (B, out*K, *S')

        flat_kernel = self.gating_kernel.reshape(-1, out * k)
        flat_x = x.reshape(batch, flat_kernel.shape[0])  # (C, *input_size) order, any layout
        if self.gating_bias is None:
            logits = flat_x @ flat_kernel
        else:
            logits = torch.addmm(self.gating_bias.reshape(-1), flat_x, flat_kernel)
        gates = self._gate(logits.view(batch, out, k)).to(hidden.dtype)  # (B, out, K)

        # Weighted sum over experts, in the layout the convolution produced, so that no copy is
        # made and the output keeps the input's memory format. Channel f*K + k is expert k of
        # filter f (filter-major), so K is the faster-varying half of the channel axis.
        if _is_channels_last(hidden):
            hidden = hidden.movedim(1, -1).unflatten(-1, (out, k))  # (B, *S', out, K), a view
            hidden = self.expert_activation(hidden, -1)
            y = (hidden * gates.view(batch, *([1] * self.ndim), out, k)).sum(-1).movedim(-1, 1)
        else:
            hidden = hidden.unflatten(1, (out, k))  # (B, out, K, *S'), a view
            hidden = self.expert_activation(hidden, 2)
            y = (hidden * gates.view(batch, out, k, *([1] * self.ndim))).sum(2)
        self._record_activity(y)
        return y

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}",
            f"kernel_size={self.kernel_size}",
            f"input_size={self.input_size}",
        ]
        if any(s != 1 for s in self.stride):
            parts.append(f"stride={self.stride}")
        parts.append(f"padding={self.padding!r}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation={self.dilation}")
        return ", ".join(parts) + ", " + self._moe_repr()


def _is_channels_last(t: Tensor) -> bool:
    """True for a 4D/5D tensor laid out channels-last (and not also plain contiguous)."""
    if t.dim() not in (4, 5) or t.is_contiguous():
        return False
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.is_contiguous(memory_format=fmt)


class Conv1dMoE(_ConvNdMoE):
    __doc__ = _ConvNdMoE.__doc__
    ndim = 1


class Conv2dMoE(_ConvNdMoE):
    __doc__ = _ConvNdMoE.__doc__
    ndim = 2


class Conv3dMoE(_ConvNdMoE):
    __doc__ = _ConvNdMoE.__doc__
    ndim = 3
