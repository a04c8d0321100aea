"""Convolutional mixtures of experts in 1D, 2D and 3D (the original's ``Conv{1,2,3}DMoE``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dispatch, routing
from .base import MoEBase, MoEOptions, check_positive_int
from .checks import resolve_gate_groups
from .keywords import rejects_original_keywords, takes_keywords_of
from .padding import PaddingSpec, SizeSpec, as_tuple, check_padding, output_size, pad_amounts
from .precision import check_input_dtype, gate_dtype, mix_dtype

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
DATA_FORMATS: tuple[str, ...] = ("channels_first", "channels_last")

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; only type checkers read it


#: ``expert_backend="auto"`` picks ``kernel_mix`` (when exact) only for outputs of at least this
#: many positions: below it the grouped convolution (one group per sample, a small GEMM each) is
#: slower than the channels path's batched one. CPU, forward + backward, 1 thread, K = 2-4:
#: kernel_mix took 1.2-1.4x the channels time at 4x4 outputs, 0.8-1.06x at 6x6 to 8x8 (and
#: 1D length 20-40), 0.2-0.45x at 32x32.
KERNEL_MIX_MIN_POSITIONS = 32

#: the dense path runs its epilogue (relu or identity, then the gate-weighted sum over K) as one
#: fused autograd Function (:func:`~moe_lab.layers.dispatch.activate_and_mix`) for convolution
#: outputs of at least this many elements, and as autograd's composition below: the Function's
#: Python-side cost (~0.1 ms a call) outweighs the memory passes it saves on small tensors.
#: Measured forward + backward, 1 thread, against the composition: 1.09-1.19x at 20-82k elements
#: (the MNIST-1D layers at B=8-32), 0.97-1.03x at 230-330k, 0.6-0.9x from 520k up.
FUSED_EPILOGUE_MIN_ELEMENTS = 2**18


class _ConvNdMoE(MoEBase):
    r"""Each of ``out_channels`` filters mixes ``n_experts`` convolution kernels with its own gate:

    .. math::
        y[b, f, p] = \sum_k g(z)[b, f, k]\, f_{act}(\mathrm{conv}_{f,k}(x)[b, p] + c[f, k]),\quad
        z[b, f, k] = \sum_{c, s} x[b, c, s] V[c, s, f, k] + d[f, k]

    The gate of a filter is one number per sample and expert, shared by every output position.
    With ``gate_input="full"`` (the original's) it is a dense map from the whole input volume, which
    ties the layer to one ``input_size``; with ``gate_input="pooled"`` it reads the globally
    average-pooled channels (``z[b, f, k] = sum_c mean_s(x[b, c, s]) V[c, f, k] + d[f, k]``),
    which works at any resolution, so ``input_size`` may be None.

    With ``top_k=k < n_experts`` each filter of each sample keeps its k largest gate logits and
    only those kernels are run (see :class:`~moe_lab.layers.base.MoEBase` for the gates).

    How the experts are computed (``expert_backend``):

    - ``"channels"``: the original's. Dense gates: ONE convolution with ``out_channels * n_experts``
      output channels (channel ``f * K + k`` is expert k of filter f), activation, mix. Top-k:
      each sample's kept kernels are gathered and run as ONE grouped convolution (the batch
      folded into channels, ``groups=B``, ``B * out * k`` output channels), then activation, mix.
    - ``"kernel_mix"`` (CondConv): mix each sample's (kept) kernels and biases with its gates,
      then ONE grouped convolution with ``B * out`` output channels. Equal to mixing the outputs
      only for linear experts, so it needs ``expert_activation`` None / ``"linear"``.
    - ``"auto"``: ``kernel_mix`` when it is exact (linear experts), at least 2 experts are
      computed per filter (all K for dense gates, k for top-k) and the output has at least
      :data:`KERNEL_MIX_MIN_POSITIONS` positions; else ``channels``. The cost model behind it:
      per sample and filter, with ``k`` experts computed, ``P`` output positions and
      ``W = C * prod(kernel_size)`` weights per kernel, channels does ``k * W * P`` multiply-adds,
      kernel_mix ``k * W + W * P``: a k-fold saving when ``P`` is large, none for ``k = 1``; at
      small ``P`` the per-sample grouped convolution's overhead outweighs it (measured, see
      :data:`KERNEL_MIX_MIN_POSITIONS`).

    Args:
        in_channels: input channels C.
        out_channels: output filters (the original's ``n_filters``).
        n_experts: experts per filter K (the original's ``n_experts_per_filter``).
        kernel_size, stride, dilation: int or one int per spatial dim.
        input_size: the spatial size of the input (no channels), one int per spatial dim.
            Required with ``gate_input="full"``; optional with ``"pooled"`` (then padding and
            output size are worked out per forward from the input's shape, and a given
            ``input_size`` only fixes ``output_size``: other sizes are accepted).
        padding: ``"valid"``, ``"same"``, ``"causal"`` (1D only) with Keras' output lengths, or
            ints (symmetric zero padding, as ``nn.Conv``).
        data_format: ``"channels_first"`` (default): inputs ``(B, C, *S)`` and outputs
            ``(B, out, *S')``; ``"channels_last"``: inputs ``(B, *S, C)`` and outputs
            ``(B, *S', out)``, as the original's default (the weights keep one layout).
        expert_activation, gating_activation, ...: the original's keywords, the routing ones
            (``top_k``, ``noisy_gating``, ``gate_input``, ``expert_backend``) and ``device`` /
            ``dtype``; all keyword-only, described in :class:`~moe_lab.layers.base.MoEBase`.

    Shape:
        input ``(B, C, *input_size)`` (channels_last memory format works too) -> output
        ``(B, out_channels, *output_size)``; with ``data_format="channels_last"``
        ``(B, *input_size, C) -> (B, *output_size, out_channels)``.

    Gate groups (``gate_groups``): G gates per sample instead of one per filter; filter f uses
    gate ``f // (out / G)``. With ``G == 1`` and dense gates, ``"kernel_mix"`` mixes every filter's
    kernels with ONE GEMM, ``gates (B, K) @ experts (K, out * C * prod(kernel_size))`` (as
    timm's CondConv2d), and in general one GEMM per gate group.

    Parameters:
        ``expert_kernel (out*K, C, *kernel_size)``, ``gating_kernel (C, *input_size, G, K)``
        (``(C, G, K)`` when pooled; ``G = out`` unless ``gate_groups``), ``expert_bias (out, K)``
        or None, ``gating_bias (G, K)`` or None; with ``noisy_gating`` also ``noise_kernel``
        (the gating kernel's shape). With ``gate_hidden`` H: ``gating_hidden_kernel
        (C, *input_size, H)`` (``(C, H)`` pooled), ``gating_hidden_bias (H,)`` and
        ``gating_kernel (H, G, K)``. With ``n_shared_experts`` S: ``shared_expert_kernel
        (out*S, C, *kernel_size)`` (row ``f*S + s`` is shared expert s of filter f) and
        ``shared_expert_bias (out, S)``. With ``balance``: the buffer ``balance_bias (G, K)``.
    """

    ndim: int

    @rejects_original_keywords
    @takes_keywords_of(MoEBase)
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_experts: int,
        kernel_size: SizeSpec,
        input_size: SizeSpec | None = None,
        *,
        stride: SizeSpec = 1,
        padding: PaddingSpec = "valid",
        dilation: SizeSpec = 1,
        data_format: str = "channels_first",
        **options: Unpack[MoEOptions],
    ) -> None:
        super().__init__(n_experts, **options)
        if data_format not in DATA_FORMATS:
            raise ValueError(
                f"data_format must be 'channels_first' (inputs (B, C, *S), the default) or "
                f"'channels_last' (inputs (B, *S, C), as the original's default), got "
                f"{data_format!r}"
            )
        self.data_format = data_format
        d = self.ndim
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.kernel_size = as_tuple(kernel_size, d, "kernel_size")
        self.stride = as_tuple(stride, d, "stride")
        self.dilation = as_tuple(dilation, d, "dilation")
        self.padding = check_padding(padding, d)
        if input_size is None and self.gate_input == "full":
            raise ValueError(
                f"{type(self).__name__} needs input_size with gate_input='full': the gate reads "
                "the whole input volume, so its weights depend on the input's size; pass "
                "input_size, or use gate_input='pooled' (gates from the average-pooled channels, "
                "any input size)"
            )
        self.input_size: tuple[int, ...] | None = None
        self.output_size: tuple[int, ...] | None = None
        self._pads: tuple[tuple[int, int], ...] | None = None
        if input_size is not None:
            self.input_size = as_tuple(input_size, d, "input_size")
            self._pads, self.output_size = self._geometry(self.input_size)

        k, out = self.n_experts, self.out_channels
        #: gates per sample, G (filter f uses gate f // (out / G))
        self.n_gates = resolve_gate_groups(self.gate_groups, out)
        self.expert_kernel = nn.Parameter(
            torch.empty(out * k, in_channels, *self.kernel_size, **self._factory)
        )
        gate_in = (in_channels,) if self.gate_input == "pooled" else (in_channels, *self.input_size)
        self._make_gate(gate_in, (self.n_gates, k))
        self._finish_init(
            expert_bias_shape=(out, k),
            gating_bias_shape=(self.n_gates, k),
            shared_kernel_shape=(out * self.n_shared_experts, in_channels, *self.kernel_size),
        )
        # the dense epilogue's backward writes a (B, out*K, *S') gradient each step: keep it
        self._epilogue_grad = dispatch.ReusableBuffer()
        # CondConv's per-sample kernels, (B, out, C * prod(kernel_size)), made each step
        self._mixed_kernels = dispatch.ReusableBuffer()

    def _geometry(
        self, spatial: tuple[int, ...]
    ) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """(before, after) padding per dim and the output size for an input of ``spatial`` size;
        ValueError when the output would be empty."""
        pads = pad_amounts(self.padding, spatial, self.kernel_size, self.stride, self.dilation)
        size = output_size(spatial, pads, self.kernel_size, self.stride, self.dilation)
        if any(n < 1 for n in size):
            what = (
                "input_size" if spatial == self.input_size or self.input_size is None else "input"
            )
            raise ValueError(
                f"{what} {spatial} is too small for kernel_size {self.kernel_size} "
                f"with dilation {self.dilation} and padding {self.padding!r} (output size would be "
                f"{size}); use a larger input, a smaller kernel or padding='same'"
            )
        return pads, size

    def reset_parameters(self) -> None:
        """The original's init: normal kernels, std ``s / sqrt(fan_in)``, with the gate's fan-in the
        whole input volume (the C pooled channels for ``gate_input="pooled"``). Biases from their
        initializers; the noise kernel zero.

        The shared experts are drawn as the routed ones. With ``gate_hidden`` H the gate's output
        layer has fan-in H, and its hidden layer is He-normal for its ReLU, std
        ``sqrt(2 / fan_in)`` (fan-in the gate input's size), which keeps the hidden features'
        scale near the input's, so the logits start as large as without the hidden layer."""
        fan_expert = self.in_channels * math.prod(self.kernel_size)
        fan_input = self.in_channels
        if self.gate_input == "full":
            fan_input *= math.prod(self.input_size)
        fan_gating = fan_input if self.gate_hidden is None else self.gate_hidden
        std_expert = self.expert_kernel_initializer_scale / math.sqrt(fan_expert)
        std_gating = self.gating_kernel_initializer_scale / math.sqrt(fan_gating)
        with torch.no_grad():
            self.expert_kernel.normal_(0.0, std_expert)
            self.gating_kernel.normal_(0.0, std_gating)
            if self.shared_expert_kernel is not None:
                self.shared_expert_kernel.normal_(0.0, std_expert)
            if self.gating_hidden_kernel is not None:
                self.gating_hidden_kernel.normal_(0.0, math.sqrt(2 / fan_input))
        self._reset_biases()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> _ConvNdMoE:
        # module.to(memory_format=torch.channels_last) converts every rank-4/5 tensor. The gating
        # kernel (C, *input_size, out, K) is rank 4 (1D layer) or 5 (2D layer) without being an
        # image, and converting it either fails (rank 5 + channels_last) or silently makes it
        # non-contiguous. Hand it (and the noise kernel, of the same shape, and the gate's hidden
        # kernel, (C, *input_size, H)) to fn as a 2D view, so dtype/device changes still apply
        # but no memory format does; the expert kernels are converted like nn.Conv's weight.
        gate_shapes = {self.gating_kernel.shape}
        if self.gating_hidden_kernel is not None:
            gate_shapes.add(self.gating_hidden_kernel.shape)

        def keep_gating_layout(t: Tensor) -> Tensor:
            if t.shape not in gate_shapes:
                return fn(t)
            flat = t.reshape(t.shape[0], -1)
            flat_applied = fn(flat)
            return t if flat_applied is flat else flat_applied.view(t.shape)

        return super()._apply(keep_gating_layout, recurse)

    def _constraint_axes(self, name: str) -> tuple[int, ...]:
        if name == "expert_kernel":
            return tuple(range(1, self.ndim + 2))  # (C, *kernel_size) of each output channel
        if name == "gating_kernel":
            # (C, *input_size): the whole input volume; (C,) for pooled gates
            return tuple(range(self.gating_kernel.dim() - 2))
        if name == "expert_bias":
            # The original's bias is (1, ..., 1, F, K) and Keras' default axis 0 is a singleton
            # axis there, so norm constraints act on each element on its own.
            return ()
        return (0,)

    def _check_rank(self, x: Tensor) -> None:
        if x.dim() != self.ndim + 2:
            spatial = tuple(map(str, self.input_size or ("*",) * self.ndim))
            dims = (
                (*spatial, str(self.in_channels))
                if self.data_format == "channels_last"
                else (str(self.in_channels), *spatial)
            )
            raise ValueError(
                f"{type(self).__name__} expected a {self.ndim + 2}D input (B, {', '.join(dims)}), "
                f"got shape {tuple(x.shape)}"
            )

    def _check_input(self, x: Tensor) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """Validate ``x``; return the padding and output size for its spatial size."""
        self._check_rank(x)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expected {self.in_channels} input channels (dim 1, channels "
                f"first), got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        check_input_dtype(type(self).__name__, x, self.expert_kernel)
        spatial = tuple(x.shape[2:])
        if spatial == self.input_size:
            assert self._pads is not None and self.output_size is not None
            return self._pads, self.output_size
        if self.gate_input == "full":
            raise ValueError(
                f"{type(self).__name__} expected spatial size {self.input_size}, got "
                f"{spatial}: the gate reads the whole input volume, so the layer is "
                f"tied to input_size; build it with input_size={spatial} (or use "
                "gate_input='pooled', which works at any size)"
            )
        return self._geometry(spatial)

    def expert_backend_for(self, output_size: Sequence[int], dense_gates: bool) -> str:
        """The backend a forward uses, ``"channels"`` or ``"kernel_mix"``, for an output of
        ``output_size`` with dense gates (``top_k`` None or ``n_experts``) or top-k ones (see the
        class docstring for the cost model of ``"auto"``)."""
        if self.expert_backend != "auto":
            return self.expert_backend
        if not self.expert_activation.is_identity:
            return "channels"  # kernel_mix would not be exact
        computed = self.n_experts if dense_gates else self.top_k
        assert computed is not None
        if computed >= 2 and math.prod(output_size) >= KERNEL_MIX_MIN_POSITIONS:
            return "kernel_mix"
        return "channels"

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, *input_size) -> (B, out_channels, *output_size)``; a channels_last
        input gives a channels_last output, as nn.Conv does. With
        ``data_format="channels_last"``: ``(B, *input_size, C) -> (B, *output_size, out)``."""
        if self.data_format == "channels_last":
            self._check_rank(x)
            if x.shape[-1] != self.in_channels:
                raise ValueError(
                    f"{type(self).__name__} (data_format='channels_last') expected "
                    f"{self.in_channels} input channels in the last dim, got {x.shape[-1]} in "
                    f"shape {tuple(x.shape)}"
                )
            # a view: (B, C, *S) in channels_last memory format, which the channels-first path
            # keeps, so moving the channels back is a view too (1D: a strided view)
            y = self._forward_channels_first(x.movedim(-1, 1)).movedim(1, -1)
        else:
            y = self._forward_channels_first(x)
        self._record_activity(y)
        return y

    def _forward_channels_first(self, x: Tensor) -> Tensor:
        pads, out_size = self._check_input(x)
        batch = x.shape[0]
        if self.gate_input == "pooled":
            spatial_dims = tuple(range(2, x.dim()))
            features = x.mean(dim=spatial_dims, dtype=gate_dtype(x, self.gating_kernel))  # (B, C)
        else:
            features = x.reshape(batch, math.prod(x.shape[1:]))  # (C, *input_size) order
        gates, index, _ = self._route(features, mix_dtype(x, self.expert_kernel))  # (B, G, k)
        backend = self.expert_backend_for(out_size, dense_gates=index is None)
        if batch == 0 or routing.in_functorch_transform(x, gates, self.expert_kernel):
            # Grouped convolutions need a batch, and data-dependent gathers cannot be vmapped:
            # the original's path with the gates of the experts not kept set to zero (same
            # values).
            dense = routing.dense_gates(gates, index, self.n_experts)
            y = self._mix_all(x, pads, self._per_filter(dense))
        elif index is None and backend == "channels":
            y = self._mix_all(x, pads, self._per_filter(gates))
        else:
            if backend == "kernel_mix":
                y = self._kernel_mix(x, pads, gates, index)
            else:
                y = self._mix_kept(x, pads, self._per_filter(gates), self._per_filter(index))
            if _is_channels_last(x):  # the grouped convolution's output is plain contiguous
                y = y.contiguous(memory_format=_channels_last_format(y))
        if self.shared_expert_kernel is not None:  # in y's memory format (add keeps it)
            y = y + self._shared(x, pads)
        return y

    def _per_filter(self, t: Tensor) -> Tensor:  # (B, G, k) -> (B, out, k)
        return dispatch.spread_to_filters(t, self.out_channels)

    def _shared(self, x: Tensor, pads: tuple[tuple[int, int], ...]) -> Tensor:
        """The shared experts, ``(B, C, *S) -> (B, out, *S')``: ``sum_s f(conv_{f,s}(x) + c)``,
        one convolution with ``out * S`` output channels (channel ``f*S + s``)."""
        kernel, bias = self.shared_expert_kernel, self.shared_expert_bias
        hidden = self._conv(x, kernel, None if bias is None else bias.reshape(-1), pads)
        hidden = hidden.unflatten(1, (self.out_channels, self.n_shared_experts))
        return self.expert_activation(hidden, 2).sum(2)

    # -- expert paths ------------------------------------------------------------------------

    def _conv(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        pads: tuple[tuple[int, int], ...],
        groups: int = 1,
    ) -> Tensor:
        if all(before == after for before, after in pads):
            padding = tuple(before for before, _ in pads)
        else:
            # Keras' odd 'same' totals and causal padding: an explicit pad (F.pad lists dims
            # last-first), then a valid convolution
            x = F.pad(x, [p for pair in reversed(pads) for p in pair])
            padding = (0,) * self.ndim
        return _CONV[self.ndim](x, weight, bias, self.stride, padding, self.dilation, groups)

    def _mix_all(self, x: Tensor, pads: tuple[tuple[int, int], ...], gates: Tensor) -> Tensor:
        """The original's path: every expert as ONE convolution, then the weighted sum with
        ``gates (B, out, K)``."""
        batch, k, out = x.shape[0], self.n_experts, self.out_channels
        bias = None if self.expert_bias is None else self.expert_bias.reshape(-1)
        hidden = self._conv(x, self.expert_kernel, bias, pads)  # (B, out*K, *S')
        gates = gates.to(hidden.dtype)
        # Weighted sum over experts, in the layout the convolution produced, so that no copy is
        # made and the output keeps the input's memory format. Channel f*K + k is expert k of
        # filter f (filter-major), so K is the faster-varying half of the channel axis.
        if _is_channels_last(hidden):
            hidden = hidden.movedim(1, -1).unflatten(-1, (out, k))  # (B, *S', out, K), a view
            hidden = self.expert_activation(hidden, -1)
            return (hidden * gates.view(batch, *([1] * self.ndim), out, k)).sum(-1).movedim(-1, 1)
        act = self.expert_activation
        fused = act.is_identity or act.fn is torch.relu
        if (
            fused
            and hidden.numel() >= max(1, FUSED_EPILOGUE_MIN_ELEMENTS)  # never for empty ones
            and hidden.is_contiguous()
            and not torch.compiler.is_compiling()
            and not routing.in_functorch_transform(hidden, gates)
        ):
            return dispatch.activate_and_mix(
                hidden, gates, relu=not act.is_identity, grad_buffer=self._epilogue_grad
            )
        hidden = hidden.unflatten(1, (out, k))  # (B, out, K, *S'), a view
        hidden = self.expert_activation(hidden, 2)
        return (hidden * gates.view(batch, out, k, *([1] * self.ndim))).sum(2)

    def _grouped(self, pads: tuple[tuple[int, int], ...]):
        """The layer's convolution as :func:`~moe_lab.layers.dispatch.grouped_conv` takes it."""
        return lambda x, weight, bias, groups: self._conv(x, weight, bias, pads, groups)

    def _mix_kept(
        self, x: Tensor, pads: tuple[tuple[int, int], ...], gates: Tensor, index: Tensor
    ) -> Tensor:
        """Top-k, ``channels`` backend: run each sample's k kept kernels per filter, then mix."""
        batch, out, k = x.shape[0], self.out_channels, index.shape[-1]
        rows = dispatch.kept_rows(index, self.n_experts)
        weight = self.expert_kernel.index_select(0, rows)  # (B*out*k, C, *ks)
        bias = None if self.expert_bias is None else self.expert_bias.reshape(-1)[rows]
        hidden = dispatch.grouped_conv(self._grouped(pads), x, weight, bias)  # (B, out*k, *S')
        hidden = self.expert_activation(hidden.unflatten(1, (out, k)), 2)  # elementwise
        gates = gates.to(hidden.dtype).view(batch, out, k, *([1] * self.ndim))
        if k == 1:
            return hidden.squeeze(2) * gates.squeeze(2)
        return (hidden * gates).sum(2)

    def _kernel_mix(
        self,
        x: Tensor,
        pads: tuple[tuple[int, int], ...],
        gates: Tensor,
        index: Tensor | None,
    ) -> Tensor:
        """CondConv: each sample's kernel per filter is the gate-weighted sum of its experts'
        (all K for dense gates, the kept k for top-k), and so is its bias; then ONE grouped
        convolution. Exact for linear experts only (checked at construction / by ``auto``).
        ``gates``, ``index`` ``(B, G, k)`` (see :func:`~moe_lab.layers.dispatch.mix_routed`)."""
        buffer = None if torch.compiler.is_compiling() else self._mixed_kernels
        weight, bias = dispatch.mix_routed(
            gates, index, self.n_experts, self.expert_kernel, self.expert_bias, buffer
        )
        return dispatch.grouped_conv(self._grouped(pads), x, weight, bias)

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
        if self.gate_input != "full":
            parts.append(f"gate_input={self.gate_input!r}")
        if self.expert_backend != "auto":
            parts.append(f"expert_backend={self.expert_backend!r}")
        if self.data_format != "channels_first":
            parts.append(f"data_format={self.data_format!r}")
        return ", ".join(parts) + ", " + self._moe_repr()


def _channels_last_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d


def _is_channels_last(t: Tensor) -> bool:
    """True for a 4D/5D tensor laid out channels-last (and not also plain contiguous); False
    inside torch.func transforms, where layouts cannot be queried (and do not matter)."""
    if t.dim() not in (4, 5) or routing.in_functorch_transform(t) or t.is_contiguous():
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
