"""A layer's routing: the router call of each forward (with the balance bias' update and the
capacity limit), and the record of the last forward, kept on the layer and read after it: the
gates (:attr:`~RoutingState.last_gates`), the auxiliary losses and the expert-usage statistics.

The math is in :mod:`moe_lab.layers.routing`, :mod:`~moe_lab.layers.balance` and
:mod:`~moe_lab.layers.capacity`; this module calls it and holds the record and its readers.
Shapes: ``N`` samples, ``G`` gate groups (1 for the dense layer; ``out_channels`` for the conv
layers, or ``gate_groups``), ``K`` experts per group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import balance, capacity, routing
from .precision import gate_dtype
from .routing import RoutingRecord


class RoutingState:
    """Mixin for the MoE layers: :meth:`_route` runs the router and ``_keep_routing`` stores each
    forward's :class:`~moe_lab.layers.routing.RoutingRecord` (references to the gate logits and
    gates, no extra work), and :attr:`last_gates`, :meth:`aux_losses` and :meth:`routing_stats`
    read it without a second pass. The host (:class:`~moe_lab.layers.base.MoEBase`) owns the
    options and parameters read here, and starts ``_routing`` as None."""

    n_experts: int
    _routing: RoutingRecord | None
    # the host's options and parameters that the router reads
    training: bool
    top_k: int | None
    noisy_gating: bool
    gating_activation: Callable[[Tensor, int], Tensor]
    balance: str | None
    balance_rate: float
    capacity_factor: float | None
    _gate_temperature: float
    gating_kernel: Tensor
    gating_bias: Tensor | None
    noise_kernel: Tensor | None
    gating_hidden_kernel: Tensor | None
    gating_hidden_bias: Tensor | None
    balance_bias: Tensor | None

    def _route(
        self, features: Tensor, mix_dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Gate features ``(N, F)`` -> gates ``(N, G, k)``, the kept experts ``(N, G, k)``
        (None when every expert is kept, in order) and, with ``capacity_factor``, each
        assignment's place in its expert's queue ``(N, G, k)`` (else None; dropped where >= the
        capacity, and their gates are 0), by :func:`~moe_lab.layers.routing.route`.

        ``F`` is the gate's input size (``in_features``; ``C * prod(input_size)`` for full conv
        gates; ``C`` for pooled ones) and ``G * K`` the gating kernel's trailing size. The gates
        come back in float32 (float64 for float64 layers). Records the routing (see the class
        docstring), and updates the balance bias in training forwards.
        """
        noisy = self.noisy_gating and self.training
        selection_bias = self.balance_bias if self.balance is not None else None
        logits, routed, noise_std, gates, index = routing.route(
            features,
            self.gating_kernel,
            self.gating_bias,
            self.noise_kernel if noisy else None,
            n_experts=self.n_experts,
            top_k=self.top_k,
            gating_activation=self.gating_activation,
            dtype=gate_dtype(features, self.gating_kernel),
            hidden_kernel=self.gating_hidden_kernel,
            hidden_bias=self.gating_hidden_bias,
            temperature=self._gate_temperature,
            selection_bias=selection_bias,
            explicit_index=self.capacity_factor is not None,
        )
        positions = kept = None
        if self.capacity_factor is not None:
            assert index is not None and self.top_k is not None
            positions = capacity.queue_positions(gates, index, self.n_experts)
            size = capacity.expert_capacity(
                index.shape[0], self.top_k, self.n_experts, self.capacity_factor
            )
            kept = positions < size
            gates = torch.where(kept, gates, gates.new_zeros(()))
        if (
            selection_bias is not None
            and index is not None
            and self.training
            and torch.is_grad_enabled()
            and not routing.in_functorch_transform(logits)
        ):
            balance.update_balance_bias(selection_bias, index, self.balance_rate)
        self._keep_routing(
            RoutingRecord(logits, routed, noise_std, gates, index, self.top_k, mix_dtype, kept)
        )
        return gates, index, positions

    def _keep_routing(self, record: RoutingRecord) -> None:
        """Keep ``record``, or nothing after a forward inside a ``torch.func`` transform (vmap,
        grad, jacrev), whose tensors cannot outlive the transform."""
        self._routing = None if routing.in_functorch_transform(record.logits) else record

    @property
    def last_gates(self) -> Tensor | None:
        """The gates of the last forward, ``(N, G, K)`` (N samples, G gate groups: 1 for the
        dense layer, ``out_channels`` for the conv layers), 0 for experts not kept, in the dtype
        the experts were mixed in; None before the first forward (or after one inside a
        ``torch.func`` transform)."""
        record = self._routing
        if record is None:
            return None
        gates = routing.dense_gates(record.gates, record.index, self.n_experts)
        return gates.to(record.gates_dtype)

    def _last_record(self, caller: str) -> RoutingRecord:
        if self._routing is None:
            raise RuntimeError(
                f"{caller} reads the routing of the last forward, and there is none: run a "
                "forward pass first (a forward inside a torch.func transform such as vmap, grad "
                "or jacrev keeps no record, since its tensors cannot outlive the transform)"
            )
        return self._routing

    def aux_losses(self) -> dict[str, Tensor]:
        """The routing's auxiliary losses from the last forward, by name (:data:`AUX_LOSS_NAMES`),
        as differentiable scalar tensors. Per gate group (each filter of a conv layer routes on
        its own) over the N samples of the batch, then averaged over groups:

        - ``importance``: ``cv^2`` of the experts' summed gates (Shazeer et al. 2017);
          ``cv^2 = var / mean^2`` over experts (population variance); 0 when balanced. The gates
          are those the experts were mixed with: 0 for assignments a capacity limit dropped.
        - ``load``: ``cv^2`` of the experts' load. With noise applied (``noisy_gating`` in
          training) and ``k < K``, the smooth estimator of Shazeer et al.: the summed
          probability that an expert stays kept when its noise is redrawn (differentiable).
          Otherwise the count of assignments routed to each expert (no gradient). The counted
          assignments: the kept experts for ``top_k``, the largest gate for a dense mixture (k=1),
          every expert for ``top_k == n_experts``.
        - ``switch``: ``K * sum_k f_k P_k`` (Switch Transformer), ``f_k`` the fraction of the
          assignments routed to expert k (they sum to 1), ``P_k`` the mean over samples of the
          softmax over all K (routed) logits; 1 for balanced routing, K when everything goes to
          one expert. Its gradient flows through ``P``.
        - ``z_loss``: mean over (sample, group) of ``logsumexp(logits)^2`` on the clean logits
          (ST-MoE), which keeps the router's logits small.
        """
        return routing.aux_losses(self._last_record("aux_losses()"), self.n_experts)

    def routing_stats(self) -> dict[str, Tensor]:
        """Expert usage in the last forward, per expert, as device tensors (no host sync):

        - ``importance`` ``(K,)``: mean gate of each expert (0 where not kept or dropped);
        - ``load`` ``(K,)``: fraction of (sample, gate group) pairs routed to expert k: whose
          kept top-k contains k (they sum to k; all 1 for ``top_k == n_experts``), or whose largest
          gate is k for a dense mixture; the router's choice, before any capacity drop;
        - ``entropy`` ``()``: mean entropy (nats) of the gate distribution, gates normalised to sum 1;
        - ``dead`` ``()``: the fraction of the ``G * K`` experts (expert k of gate group g) that
          were dead in this forward. Top-k (``top_k < n_experts``; or any ``top_k`` with
          ``capacity_factor``): chosen by no pair (in no sample's top-k, before capacity drops).
          Every expert computed (``top_k`` None or ``n_experts``): its mean share of the gate
          mass over the batch (gates clipped at 0 and normalised to sum 1, as for ``entropy``)
          is below ``1e-3 / K`` (:data:`~moe_lab.layers.routing.DEAD_SHARE`);
        - ``dropped`` ``()``: the fraction of the ``N * G * k`` assignments dropped by
          ``capacity_factor`` (0 without it).
        """
        return routing.routing_stats(self._last_record("routing_stats()"), self.n_experts)
