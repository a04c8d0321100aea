"""What the dense and convolutional MoE layers share: the original's keywords (validated and
stored in one place, :class:`MoEBase`'s ``__init__``), the gate, the weights and their penalties
and constraints.

The rest of the shared machinery lives in its own module: how the subclasses take the keywords
(:mod:`~moe_lab.layers.keywords`), resolving the Keras-style options
(:mod:`~moe_lab.layers.options`), the routing of the last forward and its readers
(:mod:`~moe_lab.layers.routing_state`), the dtype and autocast policy
(:mod:`~moe_lab.layers.precision`) and pickling (:mod:`~moe_lab.layers.pickling`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TypedDict

import torch
from torch import Tensor, nn

from . import checks, routing
from .checks import check_positive_int, check_scale
from .options import (
    ActivationSpec,
    ConstraintSpec,
    InitializerSpec,
    RegularizerSpec,
    check_constraint_axes,
    resolve_activation,
    resolve_constraint,
    resolve_initializer,
    resolve_per_weight,
    resolve_regularizer,
    scalar_penalty,
)
from .pickling import DropsForwardState
from .routing import EXPERT_BACKENDS, GATE_INPUTS, RoutingRecord
from .routing_state import RoutingState

#: The weights, by the original's names, in the order of Keras' ``get_weights()``.
PARAM_NAMES = ("expert_kernel", "gating_kernel", "expert_bias", "gating_bias")
BIAS_NAMES = ("expert_bias", "gating_bias")


class MoEOptions(TypedDict, total=False):
    """:class:`MoEBase`'s keyword-only options as a type, so that editors and type checkers show
    them on every layer, whose ``__init__`` takes them as ``**options: Unpack[MoEOptions]`` (PEP
    692); the defaults are :class:`MoEBase`'s (``help()`` shows them). A test keeps the two lists
    the same."""

    expert_activation: ActivationSpec
    gating_activation: ActivationSpec
    use_expert_bias: bool
    use_gating_bias: bool
    expert_kernel_initializer_scale: float
    gating_kernel_initializer_scale: float
    expert_bias_initializer: InitializerSpec
    gating_bias_initializer: InitializerSpec
    expert_kernel_regularizer: RegularizerSpec
    gating_kernel_regularizer: RegularizerSpec
    expert_bias_regularizer: RegularizerSpec
    gating_bias_regularizer: RegularizerSpec
    expert_kernel_constraint: ConstraintSpec
    gating_kernel_constraint: ConstraintSpec
    expert_bias_constraint: ConstraintSpec
    gating_bias_constraint: ConstraintSpec
    activity_regularizer: RegularizerSpec
    top_k: int | None
    noisy_gating: bool
    gate_input: str
    expert_backend: str
    device: torch.device | str | None
    dtype: torch.dtype | None
    gate_groups: int | None
    gate_hidden: int | None
    gate_temperature: float
    balance: str | None
    balance_rate: float
    capacity_factor: float | None
    n_shared_experts: int


class MoEBase(RoutingState, DropsForwardState, nn.Module):
    """Holds the keywords of the original's layers (everything after ``n_experts``) and the machinery
    built on them. Subclasses create the two kernels, call ``_finish_init`` and implement
    ``forward`` and ``reset_parameters``. Their ``__init__`` takes these keywords as
    ``**options``, passed on here, and shows them in its signature
    (:func:`~moe_lab.layers.keywords.takes_keywords_of`): this signature is the one list of them,
    and ``__init__`` below the one place where they are validated and stored.

    Args:
        n_experts: experts K (per output filter for the conv layers); >= 1.
        expert_activation, gating_activation: ``f`` and ``g``: None / ``"linear"`` (identity), a
            name from :data:`~moe_lab.layers.ACTIVATION_NAMES` or a callable ``fn(tensor)``.
            ``"softmax"`` normalises over the experts axis; ``"hard_sigmoid"`` is Keras'
            ``clip(0.2 x + 0.5, 0, 1)``.
        use_expert_bias, use_gating_bias: create ``expert_bias`` / ``gating_bias`` (else None).
        expert_kernel_initializer_scale, gating_kernel_initializer_scale: ``s_e``, ``s_g`` of
            the original's kernel init (see the subclasses' ``reset_parameters``); >= 0.
        expert_bias_initializer, gating_bias_initializer: a number, ``"zeros"``, ``"ones"``,
            ``"constant"``, ``"random_uniform"``, ``"random_normal"`` (Keras defaults), a dict
            with ``name`` and arguments, or a callable that fills the tensor in place.
        *_regularizer: ``"l1"`` / ``"l2"`` / ``"l1_l2"`` (Keras' factor 0.01), a dict
            ``{"l1": a, "l2": b}``, or a callable ``fn(weight) -> scalar``; read by
            :meth:`regularization_loss`. ``activity_regularizer`` acts on the layer's output.
        *_constraint: ``"max_norm"``, ``"non_neg"``, ``"unit_norm"``, ``"min_max_norm"``, a dict
            with ``name`` and Keras' arguments (``max_value``, ``min_value``, ``rate``, ``axis``),
            or a callable ``fn(weight) -> weight``; applied by :meth:`apply_constraints`. ``axis``
            indexes our layout. The default: each kernel's fan-in axes (where the original's
            Keras default ``axis=0`` would take the dense kernels' ``in`` axis, the same, but
            only the first kernel-size axis of a conv kernel); axis 0 of a bias, except the conv
            ``expert_bias``, constrained per element as in the original (whose bias is
            ``(1, ..., 1, F, K)``, so axis 0 is a singleton axis).
        top_k: None (default) for the original's dense mixture, where every expert is computed and
            mixed. An int ``1 <= k <= n_experts`` keeps, per sample (and per filter for the conv
            layers), the k experts with the largest gate logits; only those are computed (for
            ``k < n_experts``: the experts' work grows with k, not K). The kept gates are the
            softmax over the kept logits; for ``k == 1``, where that softmax is the constant 1
            and would give the router no gradient, the gate is the chosen expert's probability
            under the softmax over all K logits (Switch Transformer). ``top_k`` needs softmax
            gates: ``gating_activation`` must be ``"softmax"`` or None (which then means softmax).
            ``top_k == n_experts`` is the dense softmax mixture. ``expert_activation="softmax"``
            (a normalisation across all experts) needs ``top_k`` None or ``n_experts``.
        noisy_gating: add learned Gaussian noise to the gate logits in training (Shazeer et al.
            2017): ``std = softplus(x @ noise_kernel) + 0.01``, drawn anew each forward. Eval mode
            adds none (deterministic). Creates ``noise_kernel`` (the gating kernel's layout),
            initialised to zero: every logit starts with noise std ``softplus(0) + 0.01 = 0.70``,
            and the layer learns where to raise or lower it (the load loss rewards noise that
            balances the experts).
        gate_input: ``"full"`` (default; the original's gate, a dense map from the whole input) or
            ``"pooled"`` (conv layers: from the globally average-pooled channels, independent of
            the input's resolution). The dense layer has no spatial axes: both mean its input.
        expert_backend: ``"auto"`` (default), ``"channels"`` or ``"kernel_mix"``; how the conv
            layers compute their experts (see :class:`~moe_lab.layers.conv.Conv2dMoE`).
            ``"kernel_mix"`` is exact only for linear experts and needs ``expert_activation``
            None/``"linear"``. The dense layer accepts (and validates) it so that one set of
            keywords configures a whole network, and always computes its experts as matmuls.

        device, dtype: where and in which dtype the parameters are created (as ``nn.Linear``'s
            factory keywords); default: torch's default device and dtype.
        gate_groups: how many gates G a conv layer computes per sample: None (the original's)
            one per output filter; 1 one for the whole layer (CondConv / DynamicConv: a routing
            weight per expert, shared by every filter); g: filter f uses gate
            ``f // (out_channels / g)`` (g must divide ``out_channels``). The gating kernel and
            bias then produce ``G * K`` logits. The dense layer has one gate: None or 1 only.
        gate_hidden: None, or the width H of a hidden ReLU layer in the gate (DynamicConv's
            FC -> ReLU -> FC): ``logits = relu(features @ gating_hidden_kernel +
            gating_hidden_bias) @ gating_kernel + gating_bias``. Creates ``gating_hidden_kernel``
            (the gate input's layout with H last: dense ``(in, H)``, conv ``(C, *input_size, H)``
            or ``(C, H)`` pooled) and ``gating_hidden_bias (H,)`` (with ``use_gating_bias``);
            the gating and noise kernels then read H features: ``(H, K)`` / ``(H, G, K)``.
        gate_temperature: tau > 0; ``gates = gating_activation(logits / tau)`` (the noisy logits
            too). A plain attribute, validated when set, that may change between steps (a
            schedule); the recorded logits (``aux_losses()``) are the divided ones.
        balance: None, or ``"aux_free"`` (top-k only): DeepSeek-V3's loss-free balancing (see
            :mod:`~moe_lab.layers.balance`). A persistent buffer ``balance_bias (G, K)`` (saved
            with the state dict, zero at init) is added to the logits only to choose the kept
            experts; the kept gates stay the unbiased ones. Updated by training forwards only
            (``module.training`` and grad enabled): ``b += balance_rate * sign(mean(load) -
            load)`` per gate group. With ``top_k == n_experts`` it changes nothing.
        balance_rate: the bias' step (>= 0; 0 freezes it); read only with ``balance``.
        capacity_factor: None, or cf > 0 (top-k only): each expert of a gate group takes at
            most ``ceil(cf * N * k / K)`` of a batch's N (sample, group) pairs' assignments, in
            gate order (highest gate first; ties in sample order), the rest are dropped: they
            contribute nothing, and the sample's other gates are not renormalised (see
            :mod:`~moe_lab.layers.capacity`). Static shapes (``torch.compile(fullgraph=True)``);
            ``routing_stats()["dropped"]`` is the dropped fraction. The dense layer runs only
            the kept assignments; the conv layers compute the dropped ones with a zero gate.
        n_shared_experts: S >= 0 always-on experts added to the routed mixture with weight 1:
            ``y = mixture + sum_s f(shared_s(x))``. Parameters ``shared_expert_kernel`` (dense
            ``(in, out, S)``, conv ``(out*S, C, *kernel_size)``, row ``f*S + s`` is shared expert
            s of filter f) and ``shared_expert_bias (out, S)`` (with ``use_expert_bias``),
            initialised as the routed experts' kernel and bias.

    Regularizers and constraints given for a disabled bias are ignored (as in Keras, where the
    weight does not exist). They act on the four weights of the original only: the gate's hidden
    layer and the shared experts are neither penalised nor constrained.

    After each forward the layer keeps a record of its routing (references to the gate logits and
    gates, no extra work), read by :attr:`last_gates`, :meth:`aux_losses` and
    :meth:`routing_stats` without a second pass. It is dropped when the module is copied or
    pickled, and not kept by a forward inside a ``torch.func`` transform (vmap, grad, jacrev),
    whose tensors cannot outlive the transform. Gate logits and softmax run in float32 (float64
    for float64 layers), also under autocast.
    """

    expert_kernel: nn.Parameter
    gating_kernel: nn.Parameter
    expert_bias: nn.Parameter | None
    gating_bias: nn.Parameter | None
    gating_hidden_kernel: nn.Parameter | None
    gating_hidden_bias: nn.Parameter | None
    shared_expert_kernel: nn.Parameter | None
    shared_expert_bias: nn.Parameter | None
    balance_bias: Tensor | None
    #: tensors of the last forward, left out when the layer is pickled or copied
    _forward_state = ("_routing", "_activity_penalty")

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
        top_k: int | None = None,
        noisy_gating: bool = False,
        gate_input: str = "full",
        expert_backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        gate_groups: int | None = None,
        gate_hidden: int | None = None,
        gate_temperature: float = 1.0,
        balance: str | None = None,
        balance_rate: float = 1e-3,
        capacity_factor: float | None = None,
        n_shared_experts: int = 0,
    ) -> None:
        super().__init__()
        # the Keras-style options below are resolved by keyword name (see resolve_per_weight)
        keywords = dict(locals())
        # as nn.Linear's factory keywords: where and in which dtype the parameters are created
        self._factory: dict[str, object] = {"device": device, "dtype": dtype}
        self.n_experts = check_positive_int(n_experts, "n_experts")
        self.top_k = checks.check_top_k(top_k, self.n_experts)
        if self.top_k is not None and gating_activation is None:
            gating_activation = "softmax"  # top-k gates are a softmax over the kept logits
        self.expert_activation = resolve_activation(expert_activation, "expert_activation")
        self.gating_activation = resolve_activation(gating_activation, "gating_activation")
        if self.top_k is not None and not self.gating_activation.is_softmax:
            raise ValueError(
                f"top_k={self.top_k} needs softmax gates (the kept logits are normalised by a "
                f"softmax), got gating_activation={self.gating_activation.name!r}; use "
                "gating_activation='softmax' or None, or top_k=None for the original's dense mixture"
            )
        if self.is_sparse and self.expert_activation.is_softmax:
            raise ValueError(
                f"expert_activation='softmax' normalises across all {self.n_experts} experts, but "
                f"top_k={self.top_k} computes only {self.top_k} of them; use an elementwise expert "
                "activation, or top_k=None / top_k=n_experts"
            )
        if isinstance(noisy_gating, bool):
            self.noisy_gating = noisy_gating
        else:
            raise ValueError(f"noisy_gating must be True or False, got {noisy_gating!r}")
        self.gate_input = checks.check_choice(
            gate_input, GATE_INPUTS, "gate_input", checks.GATE_INPUT_HELP
        )
        self.expert_backend = checks.check_choice(
            expert_backend, EXPERT_BACKENDS, "expert_backend", checks.BACKEND_HELP
        )
        if self.expert_backend == "kernel_mix" and not self.expert_activation.is_identity:
            raise ValueError(
                "expert_backend='kernel_mix' mixes the experts' kernels before one convolution, "
                "which equals mixing their outputs only for linear experts; got "
                f"expert_activation={self.expert_activation.name!r}. Use expert_activation=None "
                "(or 'linear'), or expert_backend='channels' / 'auto'"
            )
        self.use_expert_bias = bool(use_expert_bias)
        self.use_gating_bias = bool(use_gating_bias)
        self.expert_kernel_initializer_scale = check_scale(
            expert_kernel_initializer_scale, "expert_kernel_initializer_scale"
        )
        self.gating_kernel_initializer_scale = check_scale(
            gating_kernel_initializer_scale, "gating_kernel_initializer_scale"
        )
        self._bias_initializers = resolve_per_weight(
            resolve_initializer, "initializer", keywords, BIAS_NAMES
        )
        self._regularizers = resolve_per_weight(
            resolve_regularizer, "regularizer", keywords, PARAM_NAMES
        )
        self._constraints = resolve_per_weight(
            resolve_constraint, "constraint", keywords, PARAM_NAMES
        )
        self._activity_regularizer = resolve_regularizer(
            activity_regularizer, "activity_regularizer"
        )
        self.gate_groups = checks.check_optional_positive_int(
            gate_groups, "gate_groups", "one gate per filter"
        )
        self.gate_hidden = checks.check_optional_positive_int(
            gate_hidden, "gate_hidden", "no hidden layer"
        )
        self.gate_temperature = gate_temperature  # validated by the property
        self.balance, self.balance_rate = checks.check_balance(balance, balance_rate, self.top_k)
        self.capacity_factor = checks.check_capacity(
            capacity_factor, self.top_k, self.expert_activation.is_softmax
        )
        self.n_shared_experts = checks.check_shared_experts(
            n_shared_experts, self.expert_activation.is_softmax
        )
        self._routing: RoutingRecord | None = None
        self._activity_penalty: Tensor | None = None

    @property
    def gate_temperature(self) -> float:
        """tau of ``gates = activation(logits / tau)``; settable between steps (checked > 0)."""
        return self._gate_temperature

    @gate_temperature.setter
    def gate_temperature(self, value: float) -> None:
        self._gate_temperature = checks.check_temperature(value)

    @property
    def is_sparse(self) -> bool:
        """True when only ``top_k < n_experts`` experts are computed per sample (and filter)."""
        return self.top_k is not None and self.top_k < self.n_experts

    @property
    def has_penalties(self) -> bool:
        """True when :meth:`regularization_loss` can be nonzero (a regularizer is set)."""
        return self._activity_regularizer is not None or any(
            reg is not None for reg in self._regularizers.values()
        )

    # -- parameters ----------------------------------------------------------------------------

    def _make_gate(self, input_shape: tuple[int, ...], logits_shape: tuple[int, ...]) -> None:
        """Create ``gating_kernel (*input_shape, *logits_shape)``, or with ``gate_hidden`` H
        ``gating_hidden_kernel (*input_shape, H)`` and ``gating_kernel (H, *logits_shape)``."""
        hidden = None
        if self.gate_hidden is not None:
            hidden = nn.Parameter(torch.empty(*input_shape, self.gate_hidden, **self._factory))
            input_shape = (self.gate_hidden,)
        self.register_parameter("gating_hidden_kernel", hidden)
        self.gating_kernel = nn.Parameter(torch.empty(*input_shape, *logits_shape, **self._factory))

    def _finish_init(
        self,
        expert_bias_shape: tuple[int, ...],
        gating_bias_shape: tuple[int, ...],
        shared_kernel_shape: tuple[int, ...] = (),
    ) -> None:
        """Create the biases (or register them as None, as nn.Linear does), the shared experts
        (``shared_kernel_shape``, used with ``n_shared_experts``), the gate's hidden bias and the
        balance bias, check explicit constraint axes against the parameter ranks, and draw the
        initial weights. Subclasses call it once their expert kernel and gate
        (:meth:`_make_gate`) exist."""
        out = expert_bias_shape[0]
        shared, hidden = self.n_shared_experts, self.gate_hidden
        for name, shape, used in (
            ("expert_bias", expert_bias_shape, self.use_expert_bias),
            ("gating_bias", gating_bias_shape, self.use_gating_bias),
            ("shared_expert_kernel", shared_kernel_shape, shared > 0),
            ("shared_expert_bias", (out, shared), shared > 0 and self.use_expert_bias),
            ("gating_hidden_bias", (hidden,), hidden is not None and self.use_gating_bias),
        ):
            param = nn.Parameter(torch.empty(shape, **self._factory)) if used else None
            self.register_parameter(name, param)
        balance_bias = None
        if self.balance is not None:
            # float32 (float64 for float64 layers): the updates are small steps on a sum that
            # a bfloat16 bias would round away
            dtype = torch.float64 if self._factory["dtype"] == torch.float64 else torch.float32
            groups = math.prod(gating_bias_shape) // self.n_experts  # G; 1 for (K,)
            balance_bias = torch.empty(
                groups, self.n_experts, device=self._factory["device"], dtype=dtype
            )
        self.register_buffer("balance_bias", balance_bias, persistent=True)
        noise = nn.Parameter(torch.empty_like(self.gating_kernel)) if self.noisy_gating else None
        self.register_parameter("noise_kernel", noise)
        for name, param in self.named_moe_parameters():
            check_constraint_axes(self._constraints[name], param.shape, f"{name}_constraint")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MoEBase:
        # layer.half() / .to(torch.bfloat16) would round the balance bias' small steps away:
        # it follows device moves and float64, and stays float32 below that
        bias = self.__dict__.get("_buffers", {}).get("balance_bias")
        if bias is None:
            return super()._apply(fn, recurse)

        def keep_precision(t: Tensor) -> Tensor:
            applied = fn(t)
            if t is bias and applied.dtype in (torch.float16, torch.bfloat16):
                return t.to(applied.device)  # unrounded
            return applied

        return super()._apply(keep_precision, recurse)

    def _reset_biases(self) -> None:
        """Biases from their initializers (the shared experts' from the expert bias'); the
        noise kernel, the gate's hidden bias and the balance bias (if any) to zero."""
        with torch.no_grad():
            for name, init in self._bias_initializers.items():
                param = getattr(self, name)
                if param is not None:
                    init(param)
            if self.shared_expert_bias is not None:
                self._bias_initializers["expert_bias"](self.shared_expert_bias)
            for zero in (self.noise_kernel, self.gating_hidden_bias, self.balance_bias):
                if zero is not None:
                    zero.zero_()

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

    # -- penalties and constraints ---------------------------------------------------------------

    def _record_activity(self, output: Tensor) -> None:
        if self._activity_regularizer is not None:
            if routing.in_functorch_transform(output):
                self._activity_penalty = None  # it could not outlive the transform
                return
            penalty = self._activity_regularizer(output)
            self._activity_penalty = scalar_penalty(penalty, "activity_regularizer")

    def regularization_loss(self) -> Tensor:
        """Sum of the weight penalties plus the activity penalty of the last forward (Keras adds
        the activity penalty unscaled by batch size, and so do we)."""
        total = self.expert_kernel.new_zeros(())
        for name, param in self.named_moe_parameters():
            reg = self._regularizers[name]
            if reg is not None:
                total = total + scalar_penalty(reg(param), f"{name}_regularizer")
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
        if self.top_k is not None:
            parts.append(f"top_k={self.top_k}")
        if self.noisy_gating:
            parts.append("noisy_gating=True")
        parts.extend(checks.variants_repr(self))
        regs = [n for n, r in self._regularizers.items() if r is not None]
        if regs:
            parts.append(f"regularized={regs}")
        cons = [n for n, c in self._constraints.items() if c is not None]
        if cons:
            parts.append(f"constrained={cons}")
        return ", ".join(parts)
