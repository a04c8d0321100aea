"""Sections a and d: MoE layers, forward + backward, against what they cannot avoid.

a. Each MoE layer of the seed's networks against its *floor*: the two products no implementation
   can skip, run forward + backward together and nothing else. For ``Conv{1,2,3}dMoE(C, out, K)``
   that is one plain convolution with ``out * K`` channels (same kernel, padding, stride) plus one
   ``Linear(C * prod(input_size), out * K)`` for the gate; for ``DenseMoE(in, out, K)`` it is
   ``Linear(in, out * K)`` plus ``Linear(in, K)``. The ratio is what the expert activation, the
   gate's softmax and the weighted sum over experts cost on top.
d. Sparse routing: a layer with 16 experts that runs only the top-1 against the same layer with a
   single expert. Runs only once the layers accept ``top_k``.

The shapes are read from the models themselves (``build_model`` on the meta device), so they follow
``conf/data/*.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor, nn

from moe_lab.config import CONFIG_DIR
from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE, MoEBase
from moe_lab.layers.padding import check_padding, pad_amounts
from moe_lab.models import build_model

from .core import BenchContext, SectionResult
from .report import Target, make_row
from .timing import calibrate_inner, interleave

__all__ = [
    "ConvMoEFloor",
    "DenseMoEFloor",
    "LayerCase",
    "model_layer_cases",
    "run_layers",
    "run_routing",
]

#: the seed demo's MoE settings (SPEC 1.3)
N_EXPERTS = 2
EXPERT_ACTIVATION = "relu"
GATING_ACTIVATION = "softmax"
LAYER_TARGET = Target("<=", 1.10)
ROUTING_TARGET = Target("<=", 1.5)
ROUTING_EXPERTS = 16

_MOE_CLASSES: dict[int, type[MoEBase]] = {0: DenseMoE, 1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}
_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class LayerCase:
    """One MoE layer's geometry, as it sits in a model.

    ``ndim`` is 0 for a :class:`DenseMoE` (``in_channels``/``out_channels`` are then its
    features), 1-3 for ``Conv{1,2,3}dMoE``. ``input_grad``: the layer's input needs a gradient
    (every layer but a network's first), so both sides of a figure compute it.
    """

    dataset: str
    position: int
    ndim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...] = ()
    input_size: tuple[int, ...] = ()
    padding: str | tuple[int, ...] = "valid"
    input_grad: bool = True

    @property
    def moe_class(self) -> type[MoEBase]:
        return _MOE_CLASSES[self.ndim]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's input shape ``(C, *input_size)`` or ``(in_features,)``."""
        return (self.in_channels, *self.input_size)

    def describe(self) -> str:
        cls = self.moe_class.__name__
        if self.ndim == 0:
            return f"{cls}({self.in_channels}→{self.out_channels}) {self.dataset} dense"
        size = "×".join(map(str, self.input_size))
        pad = self.padding if isinstance(self.padding, str) else f"pad {self.padding}"
        return (
            f"{cls} {self.dataset} L{self.position} "
            f"({self.in_channels}→{self.out_channels}, {size}, {pad})"
        )

    def build(self, n_experts: int, **kwargs: Any) -> MoEBase:
        """The MoE layer at this geometry (relu experts, softmax gates unless overridden)."""
        kwargs.setdefault("expert_activation", EXPERT_ACTIVATION)
        kwargs.setdefault("gating_activation", GATING_ACTIVATION)
        if self.ndim == 0:
            return DenseMoE(self.in_channels, self.out_channels, n_experts, **kwargs)
        return self.moe_class(
            self.in_channels,
            self.out_channels,
            n_experts,
            self.kernel_size,
            self.input_size,
            padding=self.padding,
            **kwargs,
        )


def data_geometry(dataset: str) -> tuple[tuple[int, ...], int, dict[str, Any]]:
    """``(input_shape, num_classes, topology)`` of ``conf/data/<dataset>.yaml``: its datamodule
    is constructed (nothing is read or written; constructing only derives the shapes)."""
    path = CONFIG_DIR / "data" / f"{dataset}.yaml"
    if dataset.startswith("_") or not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "data").glob("[!_]*.yaml"))
        raise FileNotFoundError(f"no data config {path}; known: {known}")
    # composed, not loaded: the presets extend conf/data/_base.yaml through their defaults list
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={dataset}", "paths.data_dir=unused"])
    datamodule = instantiate(cfg.data)
    return tuple(datamodule.input_shape), int(datamodule.num_classes), dict(datamodule.topology)


def model_layer_cases(dataset: str) -> list[LayerCase]:
    """The MoE layers of ``build_model("moe", ...)`` for ``dataset`` (its config's topology and
    its datamodule's input shape), in network order: convs, then the hidden dense."""
    input_shape, num_classes, topology = data_geometry(dataset)
    with torch.device("meta"):  # shapes only: no memory, no RNG draws
        model, _ = build_model("moe", input_shape, num_classes, topology)
    cases = []
    for position, layer in enumerate(model.moe_layers().values(), start=1):
        if isinstance(layer, DenseMoE):
            case = LayerCase(dataset, position, 0, layer.in_features, layer.out_features)
        else:
            assert isinstance(layer, (Conv1dMoE, Conv2dMoE, Conv3dMoE))
            case = LayerCase(
                dataset,
                position,
                layer.ndim,
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                layer.input_size,
                layer.padding,
            )
        cases.append(replace(case, input_grad=position > 1))
    return cases


class ConvMoEFloor(nn.Module):
    """The two products of a conv MoE layer and nothing else: one ``nn.Conv{1,2,3}d`` with
    ``out_channels * n_experts`` channels (the layer's kernel size and Keras padding) and the gate's
    ``nn.Linear(C * prod(input_size), out_channels * n_experts)``.

    Shape: ``(B, C, *input_size)`` -> ``(expert outputs (B, out*K, *output_size), gate logits
    (B, out*K))``.
    """

    def __init__(self, case: LayerCase, n_experts: int) -> None:
        super().__init__()
        d = case.ndim
        ones = (1,) * d
        pads = pad_amounts(
            check_padding(case.padding, d), case.input_size, case.kernel_size, ones, ones
        )
        symmetric = all(before == after for before, after in pads)
        # Keras' odd 'same' totals need an explicit pad, as in the layer
        self._pad = None if symmetric else [p for pair in reversed(pads) for p in pair]
        width = case.out_channels * n_experts
        conv_padding = tuple(before for before, _ in pads) if symmetric else 0
        self.conv = _CONV[d](case.in_channels, width, case.kernel_size, padding=conv_padding)
        self.gate = nn.Linear(case.in_channels * math.prod(case.input_size), width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        padded = x if self._pad is None else F.pad(x, self._pad)
        return self.conv(padded), self.gate(x.reshape(x.shape[0], -1))


class DenseMoEFloor(nn.Module):
    """The two products of ``DenseMoE(in, out, K)``: ``Linear(in, out*K)`` and ``Linear(in, K)``.

    Shape: ``(B, in)`` -> ``(expert outputs (B, out*K), gate logits (B, K))``.
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int) -> None:
        super().__init__()
        self.experts = nn.Linear(in_features, out_features * n_experts)
        self.gate = nn.Linear(in_features, n_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.experts(x), self.gate(x)


def _fwd_bwd(
    ctx: BenchContext, module: nn.Module, x: Tensor, input_grad: bool
) -> Callable[[], None]:
    """One training-style forward + backward of ``module`` on ``x``: grads reset to None first
    (as ``optimizer.zero_grad()`` does), every output back-propagated with a fixed random
    gradient of its own dtype and layout."""
    run = ctx.maybe_compile(module)
    grads: list[Tensor] = []

    def call() -> None:
        module.zero_grad(set_to_none=True)
        if input_grad:
            x.grad = None
        with ctx.autocast():
            out = run(x)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if not grads:
            generator = torch.Generator(device=x.device).manual_seed(1)
            grads.extend(
                torch.randn(o.shape, generator=generator, device=o.device, dtype=o.dtype).to(
                    memory_format=_memory_format(o)
                )
                for o in outs
            )
        torch.autograd.backward(outs, grads)

    return call


def _memory_format(t: Tensor) -> torch.memory_format:
    if (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    if (
        t.dim() == 5
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


def _channels_last(ctx: BenchContext, ndim: int, *items: Any) -> list[Any]:
    """Modules and inputs in channels_last memory format under ``--channels-last`` (2D/3D)."""
    if not ctx.options.channels_last or ndim not in (2, 3):
        return list(items)
    fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
    out = []
    for item in items:
        if isinstance(item, nn.Module):
            out.append(item.to(memory_format=fmt))
        else:
            out.append(item.contiguous(memory_format=fmt))
    return out


def _input(ctx: BenchContext, case: LayerCase, batch: int) -> Tensor:
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    x = torch.rand((batch, *case.input_shape), generator=generator, device=ctx.device)
    return x


def _measure(
    ctx: BenchContext, candidate: Callable[[], None], reference: Callable[[], None]
) -> tuple[Any, int]:
    for _ in range(ctx.warmup):  # before calibrating: first calls allocate and (maybe) compile
        candidate()
        reference()
    inner = calibrate_inner(ctx.clock, (candidate, reference), ctx.min_sample_s)
    samples = interleave(
        lambda: ctx.clock.time_calls(candidate, inner),
        lambda: ctx.clock.time_calls(reference, inner),
        warmup=1,
        repeats=ctx.repeats,
    )
    return samples, inner


def layer_figure(ctx: BenchContext, case: LayerCase, batch: int) -> dict[str, Any]:
    """Section a, one row: ``case``'s MoE layer (K=2) against its floor, at ``batch``."""
    torch.manual_seed(0)
    layer = case.build(N_EXPERTS).to(ctx.device)
    if case.ndim == 0:
        floor: nn.Module = DenseMoEFloor(case.in_channels, case.out_channels, N_EXPERTS)
        floor_text = (
            f"Linear({case.in_channels}, {case.out_channels * N_EXPERTS}) + "
            f"Linear({case.in_channels}, {N_EXPERTS})"
        )
    else:
        floor = ConvMoEFloor(case, N_EXPERTS)
        floor_text = (
            f"Conv{case.ndim}d({case.in_channels}, {case.out_channels * N_EXPERTS}) + "
            f"Linear({case.in_channels * math.prod(case.input_size)}, "
            f"{case.out_channels * N_EXPERTS})"
        )
    floor = floor.to(ctx.device)
    x = _input(ctx, case, batch)
    layer, floor, x = _channels_last(ctx, case.ndim, layer, floor, x)
    x.requires_grad_(case.input_grad)
    samples, inner = _measure(
        ctx, _fwd_bwd(ctx, layer, x, case.input_grad), _fwd_bwd(ctx, floor, x, case.input_grad)
    )
    return make_row(
        section="a",
        name=f"{case.describe()}, B={batch}",
        candidate=f"{case.moe_class.__name__}(K={N_EXPERTS}) fwd+bwd",
        reference=f"floor {floor_text} fwd+bwd",
        samples=samples,
        metric="time",
        target=LAYER_TARGET,
        device=ctx.device,
        inner=inner,
        batch=batch,
        input_grad=case.input_grad,
        note="with input grad" if case.input_grad else "no input grad (first layer)",
        layer=_case_json(case),
    )


def _case_json(case: LayerCase) -> dict[str, Any]:
    return {
        "dataset": case.dataset,
        "position": case.position,
        "class": case.moe_class.__name__,
        "in": case.in_channels,
        "out": case.out_channels,
        "kernel_size": list(case.kernel_size),
        "input_size": list(case.input_size),
        "padding": case.padding if isinstance(case.padding, str) else list(case.padding),
    }


def layer_plan(quick: bool) -> list[tuple[LayerCase, Sequence[int]]]:
    """Which layers at which batch sizes: the seed CIFAR network's four convs and its dense at
    batch 32 and 256; the first two conv layers of the MNIST-1D (Conv1dMoE) and moving-digits
    (Conv3dMoE) networks at batch 32. ``quick``: batch 32 only, and only the first 1D and 3D
    layer."""
    batches: tuple[int, ...] = (32,) if quick else (32, 256)
    plan: list[tuple[LayerCase, Sequence[int]]] = [
        (case, batches) for case in model_layer_cases("cifar10")
    ]
    for dataset in ("mnist1d", "moving_digits"):
        convs = [c for c in model_layer_cases(dataset) if c.ndim > 0]
        plan += [(case, (32,)) for case in convs[: 1 if quick else 2]]
    return plan


def run_layers(ctx: BenchContext) -> SectionResult:
    """Section a."""
    result = SectionResult()
    for case, batches in layer_plan(ctx.quick):
        for batch in batches:
            row = layer_figure(ctx, case, batch)
            result.rows.append(row)
            ctx.log(_progress(row))
    result.notes.append(
        "a: the floor is the layer's two unavoidable products (expert conv/linear with out·K "
        "outputs and the gate's linear over the whole input), forward + backward, nothing else."
    )
    return result


def _progress(row: dict[str, Any]) -> str:
    result = {True: "pass", False: "MISS", None: "n/a"}[row["pass"]]
    return (
        f"  {row['section']}  {row['name']}: {row['candidate_value'] * 1e3:.2f} ms vs "
        f"{row['reference_value'] * 1e3:.2f} ms, ratio {row['ratio']:.3f} "
        f"({row['target']['text']}: {result})"
    )


# -- d: sparse routing ------------------------------------------------------------------------------


def _try_build(case: LayerCase, n_experts: int, options: list[dict[str, Any]]) -> MoEBase | str:
    """The first of ``options`` (keyword sets) the layer accepts, or why none was."""
    errors = []
    for kwargs in options:
        try:
            return case.build(n_experts, **kwargs)
        except (TypeError, ValueError) as err:
            errors.append(f"{kwargs}: {err}")
    return "; ".join(errors)


def routing_figure(
    ctx: BenchContext, case: LayerCase, batch: int
) -> dict[str, Any] | tuple[str, str]:
    """Section d, one row, or ``(name, reason)`` when the layers cannot do it (yet)."""
    sparse_kwargs: dict[str, Any] = {"top_k": 1}
    if case.ndim > 0:
        sparse_kwargs["gate_input"] = "pooled"
    name = f"{case.describe()}, B={batch}"
    torch.manual_seed(0)
    candidate = _try_build(case, ROUTING_EXPERTS, [sparse_kwargs])
    if isinstance(candidate, str):
        return name, f"{case.moe_class.__name__} does not accept {sparse_kwargs} yet ({candidate})"
    # the single-expert layer, as close to the candidate as the layer allows
    fallbacks = [sparse_kwargs, {k: v for k, v in sparse_kwargs.items() if k != "top_k"}, {}]
    reference = _try_build(case, 1, fallbacks)
    if isinstance(reference, str):
        return name, f"no single-expert {case.moe_class.__name__} to compare with ({reference})"
    x = _input(ctx, case, batch)
    candidate, reference, x = _channels_last(
        ctx, case.ndim, candidate.to(ctx.device), reference.to(ctx.device), x
    )
    x.requires_grad_(case.input_grad)
    samples, inner = _measure(
        ctx,
        _fwd_bwd(ctx, candidate, x, case.input_grad),
        _fwd_bwd(ctx, reference, x, case.input_grad),
    )
    options = ", ".join(f"{k}={v}" for k, v in sparse_kwargs.items())
    return make_row(
        section="d",
        name=name,
        candidate=f"{case.moe_class.__name__}(K={ROUTING_EXPERTS}, {options}) fwd+bwd",
        reference=f"{case.moe_class.__name__}(K=1) fwd+bwd",
        samples=samples,
        metric="time",
        target=ROUTING_TARGET,
        device=ctx.device,
        inner=inner,
        batch=batch,
        input_grad=case.input_grad,
        note=f"reference built with {_accepted_kwargs(reference)}",
        layer=_case_json(case),
    )


def _accepted_kwargs(layer: MoEBase) -> str:
    parts = [f"n_experts={layer.n_experts}"]
    for key in ("top_k", "gate_input"):
        value = getattr(layer, key, None)
        if value is not None:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def routing_unsupported_reason() -> str | None:
    """Why the layers cannot route sparsely yet (``top_k`` refused), or None when they can."""
    try:
        DenseMoE(4, 4, 2, top_k=1)  # type: ignore[call-arg]
    except (TypeError, ValueError) as err:
        return f"the MoE layers do not accept top_k yet ({type(err).__name__}: {err})"
    return None


def run_routing(ctx: BenchContext) -> SectionResult:
    """Section d: the CIFAR network's second and fourth convs and its dense, 16 experts top-1
    against one expert, at batch 32 (and 256 unless quick)."""
    result = SectionResult()
    reason = routing_unsupported_reason()
    if reason is not None:
        result.skipped.append(
            {
                "section": "d",
                "name": f"sparse routing: K={ROUTING_EXPERTS}, top_k=1 vs K=1 (all figures)",
                "reason": reason,
                "target": ROUTING_TARGET.describe(),
            }
        )
        ctx.log(f"  d  skipped: {reason}")
        return result
    cases = model_layer_cases("cifar10")
    chosen = [cases[1], cases[3], cases[-1]]
    batches = (32,) if ctx.quick else (32, 256)
    for case in chosen:
        for batch in batches:
            outcome = routing_figure(ctx, case, batch)
            if isinstance(outcome, tuple):
                name, reason = outcome
                result.skipped.append(
                    {
                        "section": "d",
                        "name": name,
                        "reason": reason,
                        "target": ROUTING_TARGET.describe(),
                    }
                )
                ctx.log(f"  d  {name}: skipped ({reason})")
            else:
                result.rows.append(outcome)
                ctx.log(_progress(outcome))
    return result
