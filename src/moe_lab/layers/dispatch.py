"""The experts' dispatch: each sample (or row) through its own experts, as a few large ops.

- :func:`grouped_linear`: rows sorted by expert, one GEMM per expert on its contiguous slice
  (the dense layer's top-k experts).
- :func:`grouped_conv`: a different set of kernels per sample as ONE convolution of the batch
  folded into channels (``groups=B``): the conv layers' top-k experts and CondConv.
- :func:`mix_kernels`: the gate-weighted sum of each sample's kernels and biases (CondConv).
- :func:`activate_and_mix`: the conv layers' dense epilogue, expert activation + gate-weighted
  sum over K, with the fewest passes over memory eager torch allows.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import routing


def _storage_use_count(t: Tensor) -> int | None:
    """How many tensors share ``t``'s storage (plus the temporary storage handle made to ask),
    or None where torch does not say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return None
    return int(use_count(t.untyped_storage()._cdata))


class ReusableBuffer:
    """One large tensor that a layer makes every step (a parameter's gradient, the per-sample
    kernels), kept across steps so that the step does not allocate (and page-fault in) a fresh
    one.

    Why: on CPU a fresh buffer of tens of MB is a new ``mmap``, and every 4 KiB page faults on
    first touch, which costs several times the writes themselves (measured: a fresh 75 MB fill
    took ~65 ms, a resident one ~12 ms). Users:

    - the dense layer's top-k backward, which must write a gradient for ALL K experts (zeros for
      the unused ones), ``K * in * out`` floats (75 MB at K=16, 2304 -> 512);
    - the conv layers' fused epilogue, whose backward writes the ``(B, out * K, *S')``
      pre-activations' gradient;
    - CondConv's forward, whose per-sample kernels ``(B, out, C * prod(kernel_size))`` the
      grouped convolution saves for its backward (37 MB at B=256, 64 -> 64 filters of 3x3).

    :meth:`take` hands out a new tensor on the kept storage. Autograd adopts a gradient as
    ``.grad`` without a copy; once the caller drops that ``.grad`` (``zero_grad(set_to_none=True)``,
    the default), or once the backward that saved the kernels has run, the storage is ours alone
    again and the next step reuses it. While anything else still holds the storage (a kept
    ``.grad``, gradient accumulation, a tensor returned by ``torch.autograd.grad``, a graph not
    yet back-propagated, a second call before the backward), a fresh buffer is allocated
    instead, so no live tensor is ever overwritten. Not part of the state dict; dropped on copy
    and pickle.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._sole_count: int | None = None

    def take(self, like: Tensor) -> Tensor:
        """A tensor shaped like ``like``, with its dtype and device (contiguous), uninitialised."""
        return self.take_empty(like.shape, like.dtype, like.device)

    def take_empty(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous tensor of ``shape``, ``dtype`` and ``device``, uninitialised."""
        buf = self._buffer
        reusable = (
            buf is not None
            and buf.shape == tuple(shape)
            and buf.dtype == dtype
            and buf.device == device
            and self._sole_count is not None
            and _storage_use_count(buf) == self._sole_count
        )
        if not reusable:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffer, self._sole_count = buf, _storage_use_count(buf)
        assert buf is not None
        return buf.view(buf.shape)  # a tensor of its own on the same storage

    def __getstate__(self) -> dict[str, object]:
        return {"_buffer": None, "_sole_count": None}

    def __deepcopy__(self, memo: dict[int, object]) -> ReusableBuffer:
        return ReusableBuffer()


class _GroupedLinear(torch.autograd.Function):
    """``rows (M, in)`` sorted by expert, ``weight (K, out, in)`` (one ``nn.Linear`` weight per
    expert), ``bias (K, out)`` or None, ``counts`` rows per expert (host ints) -> ``(M, out)``;
    each expert's contiguous slice of rows times its own matrix (transposed, as ``F.linear``).

    A custom Function, not autograd through a loop of ``addmm`` on ``weight.unbind(0)``: the
    backward writes each expert's weight gradient straight into one ``(K, out, in)`` buffer laid
    out like ``weight`` (so it becomes ``.grad`` without a copy), where unbind's backward would
    allocate K slices and then stack them, and the forward writes into one output instead of
    concatenating. On CPU each fresh large buffer costs page faults, which dominate at this size.
    First-order only (no double backward).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        rows: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        counts: list[int],
        grad_buffer: ReusableBuffer | None,
    ) -> Tensor:
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        biases = [None] * len(counts) if bias is None else bias.unbind(0)
        parts = zip(
            counts, rows.split(counts), out.split(counts), weight.unbind(0), biases, strict=True
        )
        for count, rows_e, out_e, weight_e, bias_e in parts:
            if count and bias_e is None:
                torch.mm(rows_e, weight_e.t(), out=out_e)
            elif count:
                torch.addmm(bias_e, rows_e, weight_e.t(), out=out_e)
        ctx.save_for_backward(rows, weight)
        ctx.counts = counts
        ctx.has_bias = bias is not None
        ctx.grad_buffer = grad_buffer
        return out

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        rows, weight = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = None
        if need_weight:
            buffer = ctx.grad_buffer
            grad_weight = torch.empty_like(weight) if buffer is None else buffer.take(weight)
        grad_bias = None
        if ctx.has_bias and need_bias:
            grad_bias = weight.new_zeros(weight.shape[0], weight.shape[1])
        grad_out = grad_out.contiguous()
        device = grad_out.device.type
        with routing.autocast_off(device):
            _grouped_linear_backward(
                ctx.counts, rows, weight, grad_out, grad_rows, grad_weight, grad_bias
            )
        return grad_rows, grad_weight, grad_bias, None, None


def _grouped_linear_backward(
    counts: list[int],
    rows: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    grad_rows: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
) -> None:
    """Fill the gradient buffers of :class:`_GroupedLinear` in place."""
    n = len(counts)
    grad_rows_parts = [None] * n if grad_rows is None else grad_rows.split(counts)
    grad_weights = [None] * n if grad_weight is None else grad_weight.unbind(0)
    grad_biases = [None] * n if grad_bias is None else grad_bias.unbind(0)
    parts = zip(counts, rows.split(counts), grad_out.split(counts), weight.unbind(0),
                grad_rows_parts, grad_weights, grad_biases, strict=True)  # fmt: skip
    for count, rows_e, grad_e, weight_e, grad_rows_e, grad_weight_e, grad_bias_e in parts:
        if grad_rows_e is not None and count:
            torch.mm(grad_e, weight_e, out=grad_rows_e)
        if grad_weight_e is not None:
            if count:
                torch.mm(grad_e.t(), rows_e, out=grad_weight_e)
            else:  # an expert no row chose: its gradient is zero, and must be written
                grad_weight_e.zero_()
        if grad_bias_e is not None and count:
            torch.sum(grad_e, 0, out=grad_bias_e)


def grouped_linear(
    rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    counts: list[int],
    grad_buffer: ReusableBuffer | None = None,
) -> Tensor:
    """``(M, in) -> (M, out)``: rows ``[sum(counts[:e]), sum(counts[:e+1]))`` go through expert
    e's ``weight[e] (out, in)`` and ``bias[e] (out,)``, as ``F.linear(rows, weight[e], bias[e])``.
    One GEMM per expert on a contiguous slice (the loop is over experts, with a Python int count
    each, never over rows).

    Under autocast the operands are cast to the autocast dtype first (as ``F.linear`` would be),
    and the GEMMs run with autocast off (``out=`` GEMMs do not autocast). ``grad_buffer`` (see
    :class:`ReusableBuffer`) receives ``weight``'s gradient, which must then be contiguous.
    """
    device = rows.device.type
    if routing.autocast_enabled(device) and weight.dtype != torch.float64:  # as autocast does
        dtype = torch.get_autocast_dtype(device)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with routing.autocast_off(device):  # out= GEMMs do not autocast
        return _GroupedLinear.apply(rows, weight, bias, counts, grad_buffer)


def kept_rows(index: Tensor, n_experts: int) -> Tensor:
    """Kept experts ``(B, G, k)`` -> rows of a filter-major ``(G * K, ...)`` expert kernel,
    ``(B * G * k,)``: expert ``index[b, f, j]`` of filter f is row ``f * K + index[b, f, j]``."""
    first = torch.arange(index.shape[1], device=index.device) * n_experts
    return (index + first.view(1, -1, 1)).reshape(-1)


def spread_to_filters(t: Tensor, filters: int) -> Tensor:
    """Per-gate ``(B, G, k)`` -> per-filter ``(B, F, k)``: filter f takes gate group
    ``f // (F / G)`` (``t`` itself when every filter has its own gate)."""
    if t.shape[1] == filters:
        return t
    return t.repeat_interleave(filters // t.shape[1], dim=1)


def grouped_conv(
    conv: Callable[[Tensor, Tensor, Tensor | None, int], Tensor],
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """A different set of kernels per sample: ``x (B, C, *S)``, ``weight (B * n, C, *ks)``
    (sample-major), ``bias (B * n,)`` or None -> ``(B, n, *S')``, as ONE convolution of the batch
    folded into channels, ``groups=B``. ``conv(x, weight, bias, groups)`` is the layer's
    convolution (its stride, padding and dilation)."""
    batch = x.shape[0]
    folded = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    y = conv(folded, weight, bias, batch)  # (1, B*n, *S')
    return y.view(batch, -1, *y.shape[2:])


def mix_kernels(
    gates: Tensor,
    expert_kernel: Tensor,
    expert_bias: Tensor | None,
    rows: Tensor | None,
    buffer: ReusableBuffer | None = None,
) -> tuple[Tensor, Tensor | None]:
    """CondConv's per-sample kernels: ``expert_kernel (F * K, C, *ks)`` (filter-major: row
    ``f * K + k``), ``expert_bias (F, K)`` or None -> the mixed kernels ``(B * F, C, *ks)`` and
    biases ``(B * F,)`` or None.

    - ``rows`` None (every expert mixed): ``gates (B, G, K)`` with G dividing F, filter f taking
      gate ``f // (F / G)``; one GEMM per gate group, ``gates[:, g] (B, K) @ (K, F/G * C *
      prod(ks))`` (for G = 1 timm's CondConv GEMM), into ``buffer`` (a :class:`ReusableBuffer`)
      when one is given. For G < F the experts are first copied to that expert-major layout.
    - ``rows`` (from :func:`kept_rows`) picks the kept experts for top-k, ``gates (B, F, k)``.
    """
    batch, groups, k = gates.shape
    gates = gates.to(expert_kernel.dtype)
    if rows is None:
        filters = expert_kernel.shape[0] // k
        per_gate = filters // groups
        # (G, K, F/G * C*prod(ks)): gate group g's experts, expert-major; a view for G = F
        kernels = expert_kernel.reshape(groups, per_gate, k, -1).transpose(1, 2)
        kernels = kernels.reshape(groups, k, -1)
        if torch.compiler.is_compiling():  # dynamo cannot trace the strided out= GEMM
            mixed = torch.einsum("bgk,gkw->bgw", gates, kernels)
        else:
            mixed = _MixAllKernels.apply(gates, kernels, buffer)
        bias = None
        if expert_bias is not None and per_gate == 1:
            bias = (gates * expert_bias).sum(-1)
        elif expert_bias is not None:
            bias = torch.einsum("bgk,gpk->bgp", gates, expert_bias.view(groups, per_gate, k))
        weight = mixed.reshape(batch * filters, *expert_kernel.shape[1:])
        return weight, None if bias is None else bias.reshape(-1)
    kernels = expert_kernel.index_select(0, rows).view(batch, groups, k, -1)
    mixed = torch.einsum("bfk,bfkw->bfw", gates, kernels)
    bias = None
    if expert_bias is not None:
        bias = (gates * expert_bias.reshape(-1)[rows].view(batch, groups, k)).sum(-1)
    weight = mixed.reshape(batch * groups, *expert_kernel.shape[1:])
    return weight, None if bias is None else bias.reshape(-1)


#: With gate groups (fewer gates than filters), top-k ``kernel_mix`` mixes by the groups' GEMMs
#: over zero-filled gates, K experts each, up to ``K <= GROUP_MIX_MAX_RATIO * k``, instead of
#: gathering every filter's k kept kernels. Measured, forward + backward, 1 thread, B=32, 64
#: filters of 32x3x3, one gate group: K=4, k=2: 1.0 ms against 1.8 ms; K=8, k=2: 1.25 against
#: 1.97; K=4, k=1: 0.95 against 1.05; K=16, k=1: 1.5 against 1.2 (min; medians 1.7 against 2.2).
GROUP_MIX_MAX_RATIO = 8


def mix_routed(
    gates: Tensor,
    index: Tensor | None,
    n_experts: int,
    expert_kernel: Tensor,
    expert_bias: Tensor | None,
    buffer: ReusableBuffer | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The conv layers' ``kernel_mix``: per-gate ``gates (B, G, k)`` and kept experts ``index
    (B, G, k)`` (None: all K, in order) -> the mixed kernels and biases of :func:`mix_kernels`.

    Dense gates mix by one GEMM per gate group (ONE GEMM for a single gate). Top-k gates gather
    each filter's kept kernels when every filter has its own gate (or K is large against k);
    with gate groups they are zero-filled to all K and mixed by the groups' GEMMs instead (see
    :data:`GROUP_MIX_MAX_RATIO`): the same values."""
    filters, groups, k = expert_kernel.shape[0] // n_experts, gates.shape[1], gates.shape[2]
    if index is not None and (groups == filters or n_experts > GROUP_MIX_MAX_RATIO * k):
        gates, index = spread_to_filters(gates, filters), spread_to_filters(index, filters)
        rows = kept_rows(index, n_experts)
        return mix_kernels(gates, expert_kernel, expert_bias, rows)
    if index is not None:
        gates = routing.dense_gates(gates, index, n_experts)
    return mix_kernels(gates, expert_kernel, expert_bias, None, buffer)


class _MixAllKernels(torch.autograd.Function):
    """``gates (B, G, K)``, ``kernels (G, K, W)`` -> ``(B, G, W)``: sample b's group g is
    ``gates[b, g] @ kernels[g]`` (a group is one filter, or with gate groups several filters'
    kernels side by side in W).

    One batched GEMM over the filters, as ``einsum("bfk,fkw->bfw")`` would be, but each GEMM
    writes its ``(B, W)`` block straight into the sample-major result through a strided view
    (and the kernels' gradient reads the output gradient back the same way). ``einsum`` computes
    a filter-major ``(G, B, W)`` result and then copies it into the sample-major layout that the
    grouped convolution needs: a full extra pass over the largest tensor of the layer. The
    result is written into ``buffer`` (a :class:`ReusableBuffer`) when one is given: resident
    memory instead of a fresh allocation each step (measured at B=256, G=64, K=4, W=576: the
    forward mix took 48 ms into fresh memory, 9 ms into resident memory).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        gates: Tensor,
        kernels: Tensor,
        buffer: ReusableBuffer | None,
    ) -> Tensor:
        batch, groups, _ = gates.shape
        shape = (batch, groups, kernels.shape[-1])
        if buffer is None:
            mixed = kernels.new_empty(shape)
        else:
            mixed = buffer.take_empty(shape, kernels.dtype, kernels.device)
        if groups == 1:  # one gate (CondConv's): timm's one 2-D GEMM; a bmm of one ran slower
            torch.mm(gates[:, 0], kernels[0], out=mixed[:, 0])
        else:
            torch.bmm(gates.transpose(0, 1), kernels, out=mixed.transpose(0, 1))
        ctx.save_for_backward(gates, kernels)
        return mixed

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_mixed: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None]:
        gates, kernels = ctx.saved_tensors
        grad_gates = grad_kernels = None
        if gates.shape[1] == 1:  # one gate: the 2-D GEMMs of timm's backward
            grad = grad_mixed[:, 0]  # (B, W)
            if ctx.needs_input_grad[0]:
                grad_gates = torch.mm(grad, kernels[0].t()).unsqueeze(1)  # (B, 1, K)
            if ctx.needs_input_grad[1]:
                grad_kernels = torch.mm(gates[:, 0].t(), grad).unsqueeze(0)  # (1, K, W)
            return grad_gates, grad_kernels, None
        if ctx.needs_input_grad[0]:
            # einsum's own batched GEMM over the filters, into a fresh filter-major result
            # (a B*G*K copy), ran 10-25% faster than a bmm into the strided sample-major one
            grad_gates = torch.einsum("bfw,fkw->bfk", grad_mixed, kernels)
        if ctx.needs_input_grad[1]:
            grad_by_filter = grad_mixed.contiguous().transpose(0, 1)  # (G, B, W), a view
            grad_kernels = torch.bmm(gates.permute(1, 2, 0), grad_by_filter)  # (G, K, W)
        return grad_gates, grad_kernels, None


class _ActivateAndMix(torch.autograd.Function):
    r"""``hidden (B, G*K, *S)`` (channel ``f*K + k`` is expert k of filter f), ``gates (B, G, K)``
    -> ``y (B, G, *S)``, ``y[b, f] = sum_k gates[b, f, k] * act(hidden[b, f*K + k])``, act relu
    or the identity. Returns ``(y, hidden)`` for relu (``hidden`` is overwritten by
    ``relu(hidden)`` and marked dirty), ``(y,)`` for the identity.

    Bytes moved, float32, ``N = B * G * prod(S)`` output elements (reads + writes):

    - the minimum any implementation needs: forward reads the K pre-activations and writes y,
      ``(K + 1) N``; backward reads the output gradient and the K pre-activations (relu's value,
      its derivative and the gates' gradient all follow from them) and writes their gradient,
      ``(2K + 1) N``; in all ``4 (3K + 2) N`` bytes (the gates' ``B*G*K`` values are left out).
      This is the epilogue term of the conv layers' roofline.
    - this function, relu: forward ``relu_`` in place on the convolution's output (which its
      backward does not need) ``2KN``, then the weighted sum (:func:`_weighted_sum`): for
      K <= 4 one multiply and K - 1 in-place multiply-adds, ``(3K - 1) N``, beyond one ``bmm``
      (``(1, K) @ (K, P)`` per sample and filter) ``(K + 1) N``; backward the gates' gradient as
      one ``bmm`` ``(K + 1) N``, relu's mask applied to the broadcast output gradient
      ``(2K + 1) N``, scaled by the gates in place ``2KN``: in all ``4 (11K + 1) N`` bytes for
      K <= 4 (92 N for K=2, 2.9x the minimum 32 N), ``4 (9K + 3) N`` beyond. Nothing of size
      ``K N`` is allocated in the forward; the backward
      writes the pre-activations' gradient into a buffer kept across steps (a
      :class:`ReusableBuffer`), which saves the page faults of a fresh one.
    - the plain autograd composition (activation, broadcast multiply, sum) instead allocates and
      passes over three ``K N`` temporaries in the forward and more in the backward: measured on
      the original's first CIFAR layer (3 -> 32 at 32x32, K=2), its epilogue took several times
      the convolution's own time.

    First-order only (no double backward). The caller keeps autograd's composition where this
    does not apply (other activations, channels_last layouts, torch.func transforms), for small
    outputs (where this Function's Python cost outweighs the passes it saves) and under
    ``torch.compile``, whose compiler fuses the composition itself.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        gates: Tensor,
        relu: bool,
        grad_buffer: ReusableBuffer | None,
    ) -> tuple[Tensor, ...]:
        batch, groups, k = gates.shape
        if relu:
            hidden.relu_()
            ctx.mark_dirty(hidden)
        rows = hidden.view(batch * groups, k, -1)  # (B*G, K, P), a view
        g = gates.to(hidden.dtype).reshape(batch * groups, 1, k)
        y = _weighted_sum(rows, g).view(batch, groups, *hidden.shape[2:])
        ctx.save_for_backward(hidden, g)
        ctx.relu, ctx.gates_dtype, ctx.grad_buffer = relu, gates.dtype, grad_buffer
        ctx.set_materialize_grads(False)
        return (y, hidden) if relu else (y,)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor | None, *_: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, g = ctx.saved_tensors
        if grad_y is None:
            return None, None, None, None
        n, _, k = g.shape
        rows = hidden.view(n, k, -1)
        grad_rows = grad_y.reshape(n, 1, -1)
        grad_gates = None
        if ctx.needs_input_grad[1]:
            grad_gates = torch.bmm(grad_rows, rows.transpose(1, 2))  # (B*G, 1, K)
            grad_gates = grad_gates.view(-1, hidden.shape[1] // k, k).to(ctx.gates_dtype)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            scale = g.view(n, k, 1)
            buffer = ctx.grad_buffer
            out = torch.empty_like(rows) if buffer is None else buffer.take(rows)
            if ctx.relu:  # relu(h) > 0 exactly where h > 0: the saved output gives the mask
                torch.ops.aten.threshold_backward.grad_input(
                    grad_rows.expand_as(rows), rows, 0, grad_input=out
                )
                out.mul_(scale)
            else:
                torch.mul(grad_rows, scale, out=out)
            grad_hidden = out.view(hidden.shape)
        return grad_hidden, grad_gates, None, None


#: up to this many experts the weighted sum runs as K fused multiply-adds, beyond as one bmm
_ADDCMUL_MAX_EXPERTS = 4


def _weighted_sum(rows: Tensor, g: Tensor) -> Tensor:
    """``rows (N, K, P)``, ``g (N, 1, K)`` -> ``(N, P)``, ``sum_k g[:, 0, k] * rows[:, k]``.

    For few experts, K elementwise passes (one ``mul``, then in-place ``addcmul_``) beat a
    ``bmm`` of N tiny ``(1, K) @ (K, P)`` products, whose per-product cost dominates when P is
    small (measured, one thread: N=1024, K=2, P=40, the first MNIST-1D layer: 0.04 ms against
    0.22 ms; K=2, P=1024, the first CIFAR layer at B=32: 0.61 against 0.94 ms). From K=8 the
    passes cost more than the bmm (N=8192, P=225: 21 ms against 13 ms).
    """
    k = rows.shape[1]
    if k > _ADDCMUL_MAX_EXPERTS:
        return torch.bmm(g, rows).squeeze(1)
    y = torch.mul(rows[:, 0], g[:, :, 0])
    for e in range(1, k):
        y.addcmul_(rows[:, e], g[:, :, e])
    return y


def activate_and_mix(
    hidden: Tensor, gates: Tensor, relu: bool, grad_buffer: ReusableBuffer | None = None
) -> Tensor:
    """``hidden (B, G*K, *S)`` contiguous, ``gates (B, G, K)`` -> ``(B, G, *S)``: relu (or the
    identity) on every expert's output, then the gate-weighted sum over K (see
    :class:`_ActivateAndMix` for its bytes). ``hidden`` is overwritten for relu: pass a tensor
    nothing else reads, such as a fresh convolution output. ``grad_buffer`` (a
    :class:`ReusableBuffer`) holds ``hidden``'s gradient across steps: the convolution's backward
    consumes it and drops it, so each step reuses resident memory instead of a fresh buffer."""
    return _ActivateAndMix.apply(hidden, gates, relu, grad_buffer)[0]
