"""What a run record calls a model's routing: the options that differ from the layers' defaults."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from moe_lab.layers import MoEBase

# Routing options that differ from the layers' own defaults name a variant in the report
# (``top_k`` has a field of its own): CondConv's one gate per layer, DynamicConv's hidden gate
# layer, the balancing, capacity and shared experts tell those designs apart.
ROUTING_OPTIONS = ("noisy_gating", "gate_input", "expert_backend", "gate_groups", "gate_hidden",
                   "balance", "capacity_factor", "n_shared_experts")  # fmt: skip


def routing_variant(moe_kwargs: Mapping[str, Any]) -> str | None:
    """E.g. ``"gate_input=pooled,noisy_gating=True"``; None for the original's routing."""
    defaults = inspect.signature(MoEBase.__init__).parameters
    changed = [
        f"{key}={moe_kwargs[key]}"
        for key in ROUTING_OPTIONS
        if key in moe_kwargs and moe_kwargs[key] != defaults[key].default
    ]
    return ",".join(changed) or None
