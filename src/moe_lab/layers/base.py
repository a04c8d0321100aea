"""What the dense and convolutional MoE layers share: the seed's keywords, the gate, the penalties,
the constraints and the expert-usage statistics of the last forward."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .options import (
    ActivationSpec,
    ConstraintSpec,
    InitializerSpec,
    RegularizerSpec,
    check_constraint_axes,
    resolve_activation,
    resolve_constraint,
    resolve_initializer,
    resolve_regularizer,
)

PARAM_NAMES = ("expert_kernel", "gating_kernel", "expert_bias", "gating_bias")


def check_positive_int(value: object, argname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argname} must be a positive integer, got {value!r}")
    return value


def check_scale(value: object, argname: str) -> float:
    try:
        scale = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{argname} must be a non-negative number, got {value!r}") from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{argname} must be a finite number >= 0, got {value!r}")
    return scale


class MoEBase(nn.Module):
    """Holds the keywords of the seed's layers (everything after ``n_experts``) and the machinery
    built on them. Subclasses create the two kernels, call ``_finish_init`` and implement
    ``forward`` and ``reset_parameters``.

    Args:
        n_experts: experts K (per output filter for the conv layers); >= 1.
        expert_activation, gating_activation: ``f`` and ``g``: None / ``"linear"`` (identity), a
            name from :data:`~moe_lab.layers.ACTIVATION_NAMES` or a callable ``fn(tensor)``.
            ``"softmax"`` normalises over the experts axis; ``"hard_sigmoid"`` is Keras'
            ``clip(0.2 x + 0.5, 0, 1)``.
        use_expert_bias, use_gating_bias: create ``expert_bias`` / ``gating_bias`` (else None).
        expert_kernel_initializer_scale, gating_kernel_initializer_scale: ``s_e``, ``s_g`` of the
            seed's kernel init (see the subclasses' ``reset_parameters``); >= 0.
        expert_bias_initializer, gating_bias_initializer: a number, ``"zeros"``, ``"ones"``,
            ``"constant"``, ``"random_uniform"``, ``"random_normal"`` (Keras defaults), a dict
            with ``name`` and arguments, or a callable that fills the tensor in place.
        *_regularizer: ``"l1"`` / ``"l2"`` / ``"l1_l2"`` (Keras' factor 0.01), a dict
            ``{"l1": a, "l2": b}``, or a callable ``fn(weight) -> scalar``; read by
            :meth:`regularization_loss`. ``activity_regularizer`` acts on the layer's output.
        *_constraint: ``"max_norm"``, ``"non_neg"``, ``"unit_norm"``, ``"min_max_norm"``, a dict
            with ``name`` and Keras' arguments (``max_value``, ``min_value``, ``rate``, ``axis``),
            or a callable ``fn(weight) -> weight``; applied by :meth:`apply_constraints`. ``axis``
            indexes our layout; the default is each kernel's fan-in axes and a bias's axis 0.

    Regularizers and constraints given for a disabled bias are ignored (as in Keras, where the
    weight does not exist).

    After each forward the layer keeps the gates it used (``last_gates``, shape ``(N, G, K)``:
    N samples, G gate groups (1 for the dense layer, ``out_channels`` for conv layers), K experts)
    so that losses and statistics can be read without a second pass. They are dropped when the
    module is copied or pickled.
    """

    expert_kernel: nn.Parameter
    gating_kernel: nn.Parameter
    expert_bias: nn.Parameter | None
    gating_bias: nn.Parameter | None

    def __init__(
        self,
        n_experts: int,
        *,
        expert_activation: ActivationSpec = None,
        gating_activation: ActivationSpec = None,
        use_expert_bias: bool = True,
        use_gating_bias: bool = True,
        expert_kernel_initializer_scale: float = 1.0,
        gating_kernel_initializer_scale: float = 1.0,
        expert_bias_initializer: InitializerSpec = "zeros",
        gating_bias_initializer: InitializerSpec = "zeros",
        expert_kernel_regularizer: RegularizerSpec = None,
        gating_kernel_regularizer: RegularizerSpec = None,
        expert_bias_regularizer: RegularizerSpec = None,
        gating_bias_regularizer: RegularizerSpec = None,
        expert_kernel_constraint: ConstraintSpec = None,
        gating_kernel_constraint: ConstraintSpec = None,
        expert_bias_constraint: ConstraintSpec = None,
        gating_bias_constraint: ConstraintSpec = None,
        activity_regularizer: RegularizerSpec = None,
    ) -> None:
        super().__init__()
        self.n_experts = check_positive_int(n_experts, "n_experts")
        self.expert_activation = resolve_activation(expert_activation, "expert_activation")
        self.gating_activation = resolve_activation(gating_activation, "gating_activation")
        self.use_expert_bias = bool(use_expert_bias)
        self.use_gating_bias = bool(use_gating_bias)
        self.expert_kernel_initializer_scale = check_scale(
            expert_kernel_initializer_scale, "expert_kernel_initializer_scale"
        )
        self.gating_kernel_initializer_scale = check_scale(
            gating_kernel_initializer_scale, "gating_kernel_initializer_scale"
        )
        self._bias_initializers = {
            "expert_bias": resolve_initializer(expert_bias_initializer, "expert_bias_initializer"),
            "gating_bias": resolve_initializer(gating_bias_initializer, "gating_bias_initializer"),
        }
        self._regularizers = {
            name: resolve_regularizer(spec, f"{name}_regularizer")
            for name, spec in zip(
                PARAM_NAMES,
                (
                    expert_kernel_regularizer,
                    gating_kernel_regularizer,
                    expert_bias_regularizer,
                    gating_bias_regularizer,
                ),
                strict=True,
            )
        }
        self._constraints = {
            name: resolve_constraint(spec, f"{name}_constraint")
            for name, spec in zip(
                PARAM_NAMES,
                (
                    expert_kernel_constraint,
                    gating_kernel_constraint,
                    expert_bias_constraint,
                    gating_bias_constraint,
                ),
                strict=True,
            )
        }
        self._activity_regularizer = resolve_regularizer(
            activity_regularizer, "activity_regularizer"
        )
        self.last_gates: Tensor | None = None
        self._activity_penalty: Tensor | None = None

    # -- parameters ----------------------------------------------------------------------------

    def _finish_init(
        self, expert_bias_shape: tuple[int, ...], gating_bias_shape: tuple[int, ...]
    ) -> None:
        """Create the biases (or register them as None, as nn.Linear does), check explicit
        constraint axes against the parameter ranks, and draw the initial weights. Subclasses call
        it once their two kernels exist."""
        for name, shape, used in (
            ("expert_bias", expert_bias_shape, self.use_expert_bias),
            ("gating_bias", gating_bias_shape, self.use_gating_bias),
        ):
            self.register_parameter(name, nn.Parameter(torch.empty(shape)) if used else None)
        for name, param in self.named_moe_parameters():
            check_constraint_axes(self._constraints[name], param.shape, f"{name}_constraint")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def _reset_biases(self) -> None:
        with torch.no_grad():
            for name, init in self._bias_initializers.items():
                param = getattr(self, name)
                if param is not None:
                    init(param)

    def named_moe_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name in PARAM_NAMES:
            param = getattr(self, name)
            if param is not None:
                yield name, param

    def _constraint_axes(self, name: str) -> tuple[int, ...]:
        """The axes over which norm constraints act when no ``axis`` is given: each kernel's fan-in
        axes (the dense kernels' ``in`` axis 0 here; conv layers override), and axis 0 of a bias
        (Keras' default axis)."""
        return (0,)

    # -- gate ----------------------------------------------------------------------------------

    def _gate(self, logits: Tensor) -> Tensor:
        """Gate logits ``(N, G, K)`` -> gates ``(N, G, K)``; softmax runs over the experts axis.

        Computed in float32 under autocast, so low-precision training keeps an accurate gate.
        """
        if logits.dtype in (torch.float16, torch.bfloat16):
            gates = self.gating_activation(logits.float(), -1).to(logits.dtype)
        else:
            gates = self.gating_activation(logits, -1)
        self.last_gates = gates
        return gates

    def _check_dtype(self, x: Tensor) -> None:
        if not x.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expected a floating-point input, got dtype {x.dtype}"
            )
        dtype = self.expert_kernel.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"{type(self).__name__} has {dtype} weights but got a {x.dtype} input; convert one "
                f"of them (layer.to({dtype}) or x.to({dtype})) or run under torch.autocast"
            )

    def _record_activity(self, output: Tensor) -> None:
        if self._activity_regularizer is not None:
            penalty = self._activity_regularizer(output)
            self._activity_penalty = _scalar_penalty(penalty, "activity_regularizer")

    # -- penalties, constraints, statistics --------------------------------------------------------

    def regularization_loss(self) -> Tensor:
        """Sum of the weight penalties plus the activity penalty of the last forward (Keras adds
        the activity penalty unscaled by batch size, and so do we)."""
        total = self.expert_kernel.new_zeros(())
        for name, param in self.named_moe_parameters():
            reg = self._regularizers[name]
            if reg is not None:
                total = total + _scalar_penalty(reg(param), f"{name}_regularizer")
        if self._activity_penalty is not None:
            total = total + self._activity_penalty
        return total

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project the constrained weights in place; call after every optimizer step."""
        for name, param in self.named_moe_parameters():
            constraint = self._constraints[name]
            if constraint is not None:
                projected = constraint(param, self._constraint_axes(name))
                if not isinstance(projected, Tensor) or projected.shape != param.shape:
                    got = tuple(projected.shape) if isinstance(projected, Tensor) else projected
                    raise ValueError(
                        f"{name}_constraint must return a tensor of the weight's shape "
                        f"{tuple(param.shape)}, got {got!r}"
                    )
                param.copy_(projected)

    @torch.no_grad()
    def routing_stats(self) -> dict[str, Tensor]:
        """Expert usage in the last forward, per expert, as device tensors (no host sync):

        - ``importance`` ``(K,)``: mean gate of each expert;
        - ``load`` ``(K,)``: fraction of (sample, gate group) pairs whose largest gate is expert k;
        - ``entropy`` ``()``: mean entropy (nats) of the gate distribution, gates normalised to sum 1.
        """
        if self.last_gates is None:
            raise RuntimeError("routing_stats() needs a forward pass first")
        gates = self.last_gates.detach().float().flatten(0, -2)  # (N*G, K)
        importance = gates.mean(0)
        top = gates.argmax(-1)
        ones = torch.ones_like(top, dtype=gates.dtype)
        load = torch.zeros_like(importance).index_add_(0, top, ones)
        load = load / gates.shape[0]
        p = gates.clamp_min(0)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        return {"importance": importance, "load": load, "entropy": entropy}

    def __getstate__(self) -> dict[str, object]:
        # The tensors of the last forward belong to that forward's autograd graph: pickling or
        # deep-copying them fails (non-leaf tensors) and would drag the graph along.
        state = super().__getstate__()
        state["last_gates"] = None
        state["_activity_penalty"] = None
        return state

    def _moe_repr(self) -> str:
        parts = [
            f"n_experts={self.n_experts}",
            f"expert_activation={self.expert_activation.name}",
            f"gating_activation={self.gating_activation.name}",
        ]
        if not self.use_expert_bias:
            parts.append("use_expert_bias=False")
        if not self.use_gating_bias:
            parts.append("use_gating_bias=False")
        regs = [n for n, r in self._regularizers.items() if r is not None]
        if regs:
            parts.append(f"regularized={regs}")
        cons = [n for n, c in self._constraints.items() if c is not None]
        if cons:
            parts.append(f"constrained={cons}")
        return ", ".join(parts)


def _scalar_penalty(value: object, argname: str) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 0:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{argname} must return a scalar tensor, got {got}")
    return value
