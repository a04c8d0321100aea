"""The routing of a layer's last forward, kept on the layer and read after it: the gates
(:attr:`~RoutingState.last_gates`), the auxiliary losses and the expert-usage statistics.

The math is in :mod:`moe_lab.layers.routing`; this module holds the record and its readers.
Shapes: ``N`` samples, ``G`` gate groups (1 for the dense layer, ``out_channels`` for the conv
layers), ``K`` experts per group.
"""

from __future__ import annotations

from torch import Tensor

from . import routing
from .routing import RoutingRecord


class RoutingState:
    """Mixin for the MoE layers: ``_keep_routing`` stores each forward's
    :class:`~moe_lab.layers.routing.RoutingRecord` (references to the gate logits and gates, no
    extra work), and :attr:`last_gates`, :meth:`aux_losses` and :meth:`routing_stats` read it
    without a second pass. The host sets ``n_experts`` and starts ``_routing`` as None."""

    n_experts: int
    _routing: RoutingRecord | None

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
          ``cv^2 = var / mean^2`` over experts (population variance); 0 when balanced.
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

        - ``importance`` ``(K,)``: mean gate of each expert (0 where not kept);
        - ``load`` ``(K,)``: fraction of (sample, gate group) pairs routed to expert k: whose
          kept top-k contains k (they sum to k; all 1 for ``top_k == n_experts``), or whose largest
          gate is k for a dense mixture;
        - ``entropy`` ``()``: mean entropy (nats) of the gate distribution, gates normalised to sum 1.
        """
        return routing.routing_stats(self._last_record("routing_stats()"), self.n_experts)
