"""The compared models and their inputs: the dense baseline (Keras' ``Dense``), one ``DenseMoE``
per K (and, on request, its constant-gate twin), and the inputs ``x ~ U(0, 1)^width``."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from moe_lab.layers import DenseMoE
from moe_lab.layers.options import Activation, resolve_activation

from .settings import JacobianSettings


class DenseBaseline(nn.Module):
    """``act(W x + b)`` as Keras' ``Dense(units, activation=...)`` builds it: Glorot-uniform
    ``W``, zero ``b``. Input ``(*, in_features)`` -> output ``(*, out_features)``."""

    def __init__(self, in_features: int, out_features: int, activation: str = "relu") -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.activation: Activation = resolve_activation(activation, "dense_activation")
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x), -1)


@dataclass
class ModelEntry:
    """One compared model: ``model`` ("dense_relu", "moe" or "moe_uniform"), its K (None for
    dense), the module."""

    model: str
    n_experts: int | None
    module: nn.Module

    @property
    def label(self) -> str:
        return self.model if self.n_experts is None else f"{self.model}_K{self.n_experts}"


def _derived_seed(seed: int, *tags: int) -> int:
    """A seed for one model that depends only on (seed, tags): models are reproducible one by one."""
    return int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0])


def build_models(settings: JacobianSettings) -> list[ModelEntry]:
    """The dense baseline, then one ``DenseMoE`` per K (each followed, with
    ``uniform_gate_control``, by its constant-gate twin), in ``settings.dtype``, without grads."""
    width = settings.width
    entries: list[ModelEntry] = []
    with torch.random.fork_rng(devices=[]):  # the layers draw from the global RNG
        torch.manual_seed(_derived_seed(settings.seed, 0))
        dense = DenseBaseline(width, width, settings.dense_activation)
        entries.append(ModelEntry(f"dense_{dense.activation.name}", None, dense))
        for k in settings.n_experts:
            torch.manual_seed(_derived_seed(settings.seed, 1, k))
            moe = DenseMoE(
                width,
                width,
                k,
                expert_activation=settings.expert_activation,
                gating_activation=settings.gating_activation,
            )
            entries.append(ModelEntry("moe", k, moe))
            if settings.uniform_gate_control:
                # same experts, gate logits all zero: softmax gives 1/K whatever the input
                twin = copy.deepcopy(moe)
                with torch.no_grad():
                    twin.gating_kernel.zero_()
                    if twin.gating_bias is not None:
                        twin.gating_bias.zero_()
                entries.append(ModelEntry("moe_uniform", k, twin))
    for entry in entries:
        entry.module.to(settings.torch_dtype).eval().requires_grad_(False)
    return entries


def sample_inputs(settings: JacobianSettings) -> Tensor:
    """``(n_inputs, width)`` draws from U(0, 1), seeded by ``settings.seed``.

    Drawn in float64 and cast, so float32 and float64 runs see the same points (up to rounding).
    """
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.rand(settings.n_inputs, settings.width, generator=gen, dtype=torch.float64)
    return x.to(settings.torch_dtype)
