"""The layer sections: each MoE layer forward + backward against its floor and roofline, against
the peers users would pick instead, and sparse routing's cost as k grows.

**Floor**: the two products no implementation of a soft MoE layer can skip, forward + backward
and nothing else: for ``Conv{1,2,3}dMoE(C, out, K)`` one plain convolution with ``out * K``
channels (the layer's kernel and padding, bias included) plus the gate's
``Linear(C * prod(input_size), out * K)``; for ``DenseMoE(in, out, K)`` ``Linear(in, out * K)``
plus ``Linear(in, K)``.

**Roofline** = floor + epilogue bytes / measured copy bandwidth. The epilogue (expert activation
and the gate-weighted sum over K) must move at least, in float32 (4 bytes), with
``N = B * out * prod(output_size)`` the layer's output elements:

- forward: read the K pre-activations, write the output: ``(K + 1) N`` elements;
- backward: read the output gradient and the K pre-activations (the activation, its derivative
  and the gates' gradient all follow from them in one pass), write the pre-activations' gradient:
  ``(2K + 1) N`` elements;
- total ``4 (3K + 2) N`` bytes. The gates' own traffic (``B * out * K`` values) is left out: at
  most ``1 / prod(output_size)`` of that.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from moe_lab.config import compose_config
from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE, MoEBase, dispatch
from moe_lab.layers.capacity import expert_capacity

from .context import Context
from .measure import time_calls
from .peers import LoopMoE, NaiveOriginalConvMoE, TimmCondConv, tie_filter_gates
from .report import Row

_MOE = {0: DenseMoE, 1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: the original's demo settings: 2 experts, relu experts, softmax gates over the whole input
ORIGINAL = {"expert_activation": "relu", "gating_activation": "softmax"}


@dataclass(frozen=True)
class Shape:
    """One MoE layer's geometry in a model: ``ndim`` 0 for a DenseMoE (``cin``/``cout`` are its
    features), else the conv's spatial dims. ``first``: the network's first layer, whose input
    needs no gradient."""

    label: str
    ndim: int
    cin: int
    cout: int
    kernel: tuple[int, ...] = ()
    size: tuple[int, ...] = ()
    padding: str = "valid"
    first: bool = False

    def build(self, n_experts: int, **kwargs: object) -> MoEBase:
        if self.ndim == 0:
            return DenseMoE(self.cin, self.cout, n_experts, **kwargs)
        cls = _MOE[self.ndim]
        return cls(
            self.cin, self.cout, n_experts, self.kernel, self.size, padding=self.padding, **kwargs
        )

    def input(self, batch: int, device: torch.device) -> Tensor:
        x = torch.rand((batch, self.cin, *self.size), device=device)
        return x.requires_grad_(not self.first)


def model_shapes(ctx: Context, dataset: str) -> list[Shape]:
    """The MoE layers of the ``moe`` model on ``data=<dataset>``, read from the composed config
    (the model built on the meta device: shapes only)."""
    cfg = compose_config([f"data={dataset}", "model=moe"], output_dir=str(ctx.scratch))
    dm = instantiate(cfg.data)  # constructing derives the shapes; nothing is read
    with torch.device("meta"):
        net, _ = instantiate(cfg.module.net)(input_shape=dm.input_shape, num_classes=dm.num_classes)
    shapes = []
    for i, layer in enumerate(m for m in net.modules() if isinstance(m, MoEBase)):
        if isinstance(layer, DenseMoE):
            shapes.append(Shape(f"{dataset} dense", 0, layer.in_features, layer.out_features))
            continue
        # odd kernels with Keras 'same'/'valid' pad as torch's padding strings do
        assert all(k % 2 for k in layer.kernel_size) and isinstance(layer.padding, str)
        size = "×".join(map(str, layer.input_size))
        label = (
            f"{dataset} L{i + 1} {layer.in_channels}→{layer.out_channels} @{size} {layer.padding}"
        )
        shapes.append(Shape(label, layer.ndim, layer.in_channels, layer.out_channels,
                            layer.kernel_size, layer.input_size, layer.padding, first=i == 0))  # fmt: skip
    return shapes


class Floor(nn.Module):
    """The layer's two products (see the module docstring): ``x -> (expert pre-activations,
    gate logits)``."""

    def __init__(self, shape: Shape, n_experts: int) -> None:
        super().__init__()
        width = shape.cout * n_experts
        if shape.ndim == 0:
            self.experts: nn.Module = nn.Linear(shape.cin, width)
            self.gate = nn.Linear(shape.cin, n_experts)
        else:
            self.experts = _CONV[shape.ndim](shape.cin, width, shape.kernel, padding=shape.padding)
            self.gate = nn.Linear(shape.cin * math.prod(shape.size), width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.experts(x), self.gate(x.flatten(1))


class CondConvFloor(nn.Module):
    """CondConv's products that no implementation can skip, forward + backward: ONE grouped
    convolution of ``x (B, C, H, W)`` with ``B * out`` per-sample 3x3 kernels (a leaf here, so its
    backward writes the per-sample kernels' gradient, as any CondConv's must) and the router's
    ``Linear(C, G * K)`` of the average-pooled input, G the gate groups (1: CondConv's one routing
    weight per expert; ``out``: the original's gate per filter). What is left out, the mix of the
    experts' kernels, is memory-bound and counted in bytes (:func:`condconv_mix_bytes`)."""

    def __init__(
        self, cin: int, cout: int, n_experts: int, batch: int, padding: int, gate_groups: int = 1
    ) -> None:
        super().__init__()
        self.padding = padding
        self.kernels = nn.Parameter(torch.randn(batch * cout, cin, 3, 3) / math.sqrt(9 * cin))
        self.bias = nn.Parameter(torch.zeros(batch * cout))
        self.router = nn.Linear(cin, gate_groups * n_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        def conv(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
            return torch.conv2d(x, weight, bias, 1, self.padding, 1, groups)

        y = dispatch.grouped_conv(conv, x, self.kernels, self.bias)
        return y, self.router(x.mean((2, 3)))


def condconv_mix_bytes(cin: int, cout: int, n_experts: int, batch: int) -> int:
    """The fewest bytes the mix of CondConv's kernels moves, float32, with ``W = 9 C`` weights per
    3x3 kernel and ``G = out`` filters: forward reads the ``K G W`` expert weights and writes the
    ``B G W`` per-sample kernels; backward reads the per-sample kernels' gradient once and the
    experts once (the gates' gradient and the experts' both follow in that one pass) and writes
    the experts' gradient: ``4 (2 B + 3 K) G W`` bytes."""
    width = 9 * cin
    return 4 * (2 * batch + 3 * n_experts) * cout * width


def add_roofline(ctx: Context, row: Row, base: str, nbytes: int) -> None:
    """``row``'s roofline, round by round: the measured side ``base`` plus ``nbytes`` at the
    measured copy bandwidth."""
    row.add("roofline", [t + nbytes / ctx.bandwidth for t in row.samples[base]])


def epilogue_bytes(shape: Shape, batch: int, n_experts: int, out: Tensor) -> int:
    """``4 (3K + 2) N`` bytes, N the output's elements (see the module docstring)."""
    assert out.shape[0] == batch and out.shape[1] == shape.cout
    return 4 * (3 * n_experts + 2) * out.numel()


def fwd_bwd(module: nn.Module, x: Tensor) -> Callable[[], None]:
    """One training-style forward + backward: gradients reset to None first (as
    ``zero_grad()``), every output back-propagated with a fixed random gradient."""
    grads: list[Tensor] = []

    def call() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        outs = list(out) if isinstance(out, tuple) else [out]
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grads)

    return call


def _measure(ctx: Context, row: Row, modules: dict[str, nn.Module], x: Tensor) -> None:
    fns = {label: fwd_bwd(m.to(ctx.device), x) for label, m in modules.items()}
    samples, inner = time_calls(
        ctx.clock, fns, warmup=ctx.warmup, repeats=ctx.repeats, min_sample_s=ctx.min_sample_s
    )
    for label, values in samples.items():
        row.add(label, values)
    row.info["calls_per_sample"] = inner


def _layer_plan(ctx: Context) -> Iterator[tuple[Shape, int]]:
    cifar = model_shapes(ctx, "cifar10")
    for batch in (8,) if ctx.quick else (32, 256):
        yield from ((s, batch) for s in cifar)
    for dataset in ("mnist1d", "moving_digits"):
        yield from (
            (s, 8 if ctx.quick else 32) for s in model_shapes(ctx, dataset)[: 1 if ctx.quick else 2]
        )


def run_layers(ctx: Context) -> Iterator[Row]:
    """Each layer of the original's networks (K=2, relu experts, softmax gates over the whole
    input) against its floor, its roofline and, for convs, the naive port of the original."""
    k = 2
    for shape, batch in _layer_plan(ctx):
        torch.manual_seed(0)
        layer = shape.build(k, **ORIGINAL)
        modules: dict[str, nn.Module] = {"moe_lab": layer, "floor": Floor(shape, k)}
        if shape.ndim:
            modules["naive port"] = NaiveOriginalConvMoE(
                shape.cin, shape.cout, k, shape.kernel, shape.size, shape.padding, shape.ndim
            ).copy_from(layer)
        x = shape.input(batch, ctx.device)
        kind = type(layer).__name__
        row = Row("layers", f"{kind} {shape.label}, B={batch}", info={"batch": batch})
        _measure(ctx, row, modules, x)
        with torch.no_grad():
            nbytes = epilogue_bytes(shape, batch, k, layer.to(ctx.device)(x))
        add_roofline(ctx, row, "floor", nbytes)
        row.info.update(epilogue_bytes=nbytes, bandwidth=ctx.bandwidth, input_grad=not shape.first,
                        layer={"class": kind, "in": shape.cin, "out": shape.cout,
                               "input_size": list(shape.size), "padding": shape.padding})  # fmt: skip
        row.ratio(
            "× roofline",
            "moe_lab",
            "roofline",
            1.25 if shape.label.startswith("cifar10 L") else None,
        )
        if "naive port" in modules:
            row.ratio("× naive port", "moe_lab", "naive port", 1.0)
        yield row


def _condconv_row(ctx: Context, k: int, cin: int, cout: int, size: int, batch: int) -> Row:
    """CondConv (``gate_groups=1``: one routing weight per expert, one GEMM mixes the kernels)
    against timm's CondConv2d and the roofline; beside them the same layer with the original's
    gate per filter (tied to one, so it computes the same function), whose mix is a batched
    GEMM over the filters."""
    name = (
        f"Conv2dMoE kernel_mix gate_groups=1 K={k} {cin}→{cout} @{size}×{size}, B={batch} "
        "vs timm CondConv2d"
    )
    row = Row("peers", name, info={"batch": batch, "peer": "timm.layers.CondConv2d"})
    torch.manual_seed(0)
    common = dict(padding=1, gate_input="pooled", expert_backend="kernel_mix",
                  gating_activation="sigmoid")  # fmt: skip
    layer = Conv2dMoE(cin, cout, k, 3, (size, size), gate_groups=1, **common)
    per_filter = tie_filter_gates(Conv2dMoE(cin, cout, k, 3, (size, size), **common))
    try:
        peer = TimmCondConv(cin, cout, 3, k, padding=1).copy_from(layer)
    except ImportError:
        row.name += ": timm not installed"
        return row
    _against_timm(ctx, row, {"moe_lab": layer, "per-filter gates": per_filter, "peer": peer})
    row.ratio("per-filter × peer", "per-filter gates", "peer")
    return row


def _against_timm(ctx: Context, row: Row, modules: dict[str, nn.Module]) -> None:
    """Measure ``modules`` (a ``"moe_lab"`` layer, its timm ``"peer"``, any others) beside
    CondConv's floor on one input, add the roofline (floor + the mix's bytes at the measured
    bandwidth), and the ratios of moe_lab and timm against them."""
    layer = modules["moe_lab"]
    k, cin, cout, size = layer.n_experts, layer.in_channels, layer.out_channels, layer.input_size
    batch = row.info["batch"]
    floor = CondConvFloor(cin, cout, k, batch, padding=1)
    x = torch.rand(batch, cin, *size, device=ctx.device, requires_grad=True)
    _measure(ctx, row, {**modules, "floor": floor}, x)
    nbytes = condconv_mix_bytes(cin, cout, k, batch)
    add_roofline(ctx, row, "floor", nbytes)
    row.info.update(mix_bytes=nbytes, bandwidth=ctx.bandwidth)
    row.ratio("× peer", "moe_lab", "peer", 1.0)
    row.ratio("× roofline", "moe_lab", "roofline")
    row.ratio("peer × roofline", "peer", "roofline")  # how close timm itself gets


#: the ``dynamic_conv`` preset's gate: FC1's width, and tau at the schedule's start
DYNAMIC_CONV_HIDDEN, DYNAMIC_CONV_TAU = 16, 30.0


def _dynamic_conv_row(ctx: Context, k: int, cin: int, cout: int, size: int, batch: int) -> Row:
    """The ``dynamic_conv`` preset's layer (one softmax gate over K from an MLP of the pooled
    channels, tau, kernels mixed by one GEMM) against timm's CondConv2d fed by the same MLP
    router, and against CondConv's roofline (the MLP's two small GEMMs are left out of it)."""
    name = (
        f"Conv2dMoE dynamic_conv K={k} {cin}→{cout} @{size}×{size}, B={batch} "
        "vs timm CondConv2d + MLP gate"
    )
    row = Row("peers", name, info={"batch": batch, "peer": "timm.layers.CondConv2d + MLP router"})
    torch.manual_seed(0)
    hidden, tau = DYNAMIC_CONV_HIDDEN, DYNAMIC_CONV_TAU
    layer = Conv2dMoE(cin, cout, k, 3, (size, size), padding=1, gate_input="pooled",
                      gate_groups=1, gate_hidden=hidden, gate_temperature=tau,
                      expert_backend="kernel_mix", gating_activation="softmax")  # fmt: skip
    try:
        peer = TimmCondConv(cin, cout, 3, k, padding=1, router_hidden=hidden, routing="softmax",
                            temperature=tau).copy_from(layer)  # fmt: skip
    except ImportError:
        row.name += ": timm not installed"
        return row
    _against_timm(ctx, row, {"moe_lab": layer, "peer": peer})
    row.info.update(gate_hidden=hidden, tau=tau)
    return row


def _dense_row(ctx: Context, top_k: int, cin: int, cout: int, batch: int) -> Row:
    k = 16
    name = f"DenseMoE K={k} top_k={top_k} {cin}→{cout}, B={batch} vs per-expert loop"
    row = Row("peers", name, info={"batch": batch, "peer": "LoopMoE (Mixtral-style)"})
    torch.manual_seed(0)
    layer = DenseMoE(cin, cout, k, top_k=top_k)
    # the kept experts' multiply-adds as one GEMM: each row through top_k matrices of (in, out)
    modules = {"moe_lab": layer, "peer": LoopMoE(cin, cout, k, top_k).copy_from(layer),
               "nn.Linear": nn.Linear(cin, top_k * cout)}  # fmt: skip
    _measure(ctx, row, modules, torch.rand(batch, cin, device=ctx.device, requires_grad=True))
    # every step reads all experts' weights (forward, input gradient) and writes their gradient
    weight_bytes = 3 * 4 * k * cin * cout
    row.times["weight bytes"] = weight_bytes / ctx.bandwidth
    add_roofline(ctx, row, "nn.Linear", weight_bytes)
    row.info.update(weight_bytes=weight_bytes, bandwidth=ctx.bandwidth,
                    linear=f"nn.Linear({cin}, {top_k * cout})")  # fmt: skip
    row.ratio("× peer", "moe_lab", "peer", 1.0)
    row.ratio("× nn.Linear", "moe_lab", "nn.Linear", 1.5 if batch >= 1024 else None)
    row.ratio("× roofline", "moe_lab", "roofline")
    return row


def run_peers(ctx: Context) -> Iterator[Row]:
    """CondConv (``Conv2dMoE(expert_backend="kernel_mix", gate_input="pooled", gate_groups=1)``,
    linear experts) and DynamicConv (the ``dynamic_conv`` preset's layer) against timm's
    CondConv2d with the same router and against CondConv's roofline (:class:`CondConvFloor` plus
    the mix's bytes at the measured bandwidth); sparse ``DenseMoE(K=16)`` against the per-expert
    loop of Mixtral-style code, against one ``nn.Linear(in, top_k * out)`` (the kept experts'
    multiply-adds as one GEMM) and against its roofline: that Linear's time plus the time to read
    all K experts' weights twice and write their gradient once at the measured bandwidth."""
    batches = (8,) if ctx.quick else (32, 256)
    convs = ((32, 64, 16), (64, 64, 8))
    yield from (
        _condconv_row(ctx, k, cin, cout, size, batch)
        for k in ((4,) if ctx.quick else (4, 8))
        for cin, cout, size in convs
        for batch in batches
    )
    yield from (
        _dynamic_conv_row(ctx, 4, cin, cout, size, batch)
        for cin, cout, size in convs[: 1 if ctx.quick else 2]
        for batch in batches
    )
    yield from (
        _dense_row(ctx, top_k, cin, cout, batch)
        for top_k in ((1,) if ctx.quick else (1, 2))
        for cin, cout in ((512, 512),) + (() if ctx.quick else ((2304, 512),))
        for batch in ((8,) if ctx.quick else (32, 256, 1024))
    )


def _capacity_row(
    ctx: Context, top_k: int, factor: float, cin: int, cout: int, batch: int, compiled: bool
) -> Row:
    k = 16
    name = (
        f"DenseMoE K={k} top_k={top_k} capacity_factor={factor:g} {cin}→{cout}, B={batch} "
        "vs per-expert loop"
    )
    row = Row("capacity", name, info={"batch": batch, "peer": "LoopMoE with capacity"})
    torch.manual_seed(0)
    layer = DenseMoE(cin, cout, k, top_k=top_k, capacity_factor=factor)
    modules: dict[str, nn.Module] = {
        "moe_lab": layer,
        "peer": LoopMoE(cin, cout, k, top_k, capacity_factor=factor).copy_from(layer),
    }
    # zero-mean inputs: the router spreads them about evenly, as a balanced router does, so the
    # capacity drops only the overflow of chance (uniform [0, 1) inputs send most rows to one
    # expert, and the timing would measure that expert alone)
    x = torch.randn(batch, cin, device=ctx.device, requires_grad=True)
    if compiled:
        # its own copy: the eager calls between its calls must not touch what its guards read;
        # dynamo's cache is per code object, so a fresh start per shape (else the next row's
        # shape is a recompile)
        torch._dynamo.reset()
        graph = torch.compile(copy.deepcopy(layer), fullgraph=True, dynamic=False)
        modules["moe_lab compiled"] = graph
    # every recompile is an error: what is timed is the one graph, never a silent eager fallback
    with torch._dynamo.config.patch(error_on_recompile=True):
        _measure(ctx, row, modules, x)
    with torch.no_grad():
        layer.to(ctx.device)(x)
    dropped = float(layer.routing_stats()["dropped"])
    # static shapes: every expert computes its C rows, kept or not; the loop only the kept ones
    padded = k * expert_capacity(batch, top_k, k, factor)
    row.info.update(dropped=dropped, compiled=compiled, rows_computed=padded,
                    rows_kept=round(batch * top_k * (1 - dropped)))  # fmt: skip
    row.ratio("× peer", "moe_lab", "peer", 1.0)
    if compiled:
        row.ratio("compiled × peer", "moe_lab compiled", "peer", 1.0)
        row.ratio("compiled × eager", "moe_lab compiled", "moe_lab")
    return row


def run_capacity(ctx: Context) -> Iterator[Row]:
    """Top-k routing with the Switch Transformer's expert capacity (static shapes: every expert
    runs on a ``(C, in)`` block) against the per-expert loop that drops the same overflow, eager
    and under ``torch.compile(fullgraph=True)`` (compiled only in full runs: inductor's C++
    compile takes seconds per shape)."""
    for top_k in (1,) if ctx.quick else (1, 2):
        for batch in (8,) if ctx.quick else (256, 1024):
            yield _capacity_row(ctx, top_k, 1.25, 512, 512, batch, compiled=not ctx.quick)


def run_routing(ctx: Context) -> list[Row]:
    """Sparse routing's cost as k grows: ``K=16, top_k=k`` against the dense layer with k experts
    (the same multiply-adds) and with all 16, all measured in one interleaved group per layer."""
    conv = Shape("cifar10 L4 64→64 @15×15 valid", 2, 64, 64, (3, 3), (15, 15))
    dense = Shape("cifar10 dense 2304→512", 0, 2304, 512)
    plan = [(dense, 8, (1, 2))] if ctx.quick else [(conv, 32, (1, 2, 4)), (dense, 256, (1, 2, 4))]
    rows = []
    for shape, batch, ks in plan:
        extra = {"gate_input": "pooled"} if shape.ndim else {}
        torch.manual_seed(0)
        modules = {f"dense K={k}": shape.build(k, **ORIGINAL, **extra) for k in (*ks, 16)}
        modules |= {f"top_k={k}": shape.build(16, top_k=k, **ORIGINAL, **extra) for k in ks}
        group = Row("routing", "")
        _measure(ctx, group, modules, shape.input(batch, ctx.device))
        for k in ks:
            name = f"{type(modules['dense K=16']).__name__} {shape.label}, B={batch}, top_k={k}"
            row = Row("routing", name, info={"batch": batch, **group.info, **extra})
            for label, side in (("sparse K=16", f"top_k={k}"), ("dense K=k", f"dense K={k}"),
                                ("dense K=16", "dense K=16")):  # fmt: skip
                row.add(label, group.samples[side])
            row.ratio("× dense K=k", "sparse K=16", "dense K=k", 1.5)
            row.ratio("× dense K=16", "sparse K=16", "dense K=16")
            rows.append(row)
    return rows
