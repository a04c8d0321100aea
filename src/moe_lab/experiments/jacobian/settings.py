"""The Jacobian experiment's knobs: :class:`JacobianSettings`, validated on construction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe_lab.layers.options import resolve_activation

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check_int(value: Any, key: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r} ({hint})")
    return value


@dataclass(frozen=True)
class JacobianSettings:
    """The experiment's knobs, validated on construction (each error names its config key).

    Attributes:
        n_inputs: number of inputs ``x ~ U(0, 1)^width`` (>= 2, for a standard error).
        width: input and output size of every layer.
        n_experts: the K of each mixture, e.g. ``(1, 2, 5, 10, 20)``.
        expert_activation, gating_activation: the mixture's f and g (names as in
            :data:`moe_lab.layers.ACTIVATION_NAMES`).
        dense_activation: the dense baseline's activation.
        seed: seeds the inputs and, per model, the weights (a model's weights depend on the seed
            and its K only, not on the rest of the K list).
        dtype: ``"float32"`` (the original's precision) or ``"float64"``; also sets the ``eps`` of
            the rank tolerance.
        chunk_size: inputs per ``vmap`` chunk (``None``: all at once; lower it to save memory).
        num_threads: torch intra-op threads while the experiment runs (restored after); None
            keeps torch's setting. Default 1: the work is hundreds of tiny SVDs and GEMMs that
            gain little from threads, and on a busy CPU two spinning threads per op made the
            default run ~7x slower (23 s vs 3 s measured on the 2-core dev machine).
        uniform_gate_control: also run, per K, the same mixture with its gating kernel and bias
            set to zero, so every gate is the constant ``g(0)`` (1/K for softmax; model
            ``moe_uniform``). It separates what the input-dependent gate adds from what summing
            K ReLU experts adds.
    """

    n_inputs: int = 250
    width: int = 128
    n_experts: tuple[int, ...] = (1, 2, 5, 10, 20)
    expert_activation: str = "relu"
    gating_activation: str = "softmax"
    dense_activation: str = "relu"
    seed: int = 0
    dtype: str = "float32"
    chunk_size: int | None = None
    num_threads: int | None = 1
    uniform_gate_control: bool = False

    def __post_init__(self) -> None:
        _check_int(self.n_inputs, "n_inputs", 2, "the standard error needs two inputs or more")
        _check_int(self.width, "width", 1, "e.g. width=128")
        ks = self.n_experts
        if isinstance(ks, int) and not isinstance(ks, bool):
            ks = (ks,)
        if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
            raise ValueError(
                f"n_experts must be a non-empty list of integers, e.g. n_experts=[1,20]; got {ks!r}"
            )
        for k in ks:
            _check_int(k, "n_experts", 1, f"every entry is a number of experts; got {list(ks)}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"n_experts has repeated entries: {list(ks)}; list each K once")
        object.__setattr__(self, "n_experts", tuple(ks))
        for key in ("expert_activation", "gating_activation", "dense_activation"):
            resolve_activation(getattr(self, key), key)  # raises ValueError naming the key
        _check_int(self.seed, "seed", 0, "e.g. seed=0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.chunk_size is not None:
            _check_int(self.chunk_size, "chunk_size", 1, "or null to compute all inputs at once")
        if self.num_threads is not None:
            _check_int(self.num_threads, "num_threads", 1, "or null to keep torch's setting")
        if not isinstance(self.uniform_gate_control, bool):
            raise ValueError(
                f"uniform_gate_control must be true or false, got {self.uniform_gate_control!r}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | DictConfig) -> JacobianSettings:
        """Pick this experiment's keys from a (Hydra) config; other keys are ignored."""
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        names = cls.__dataclass_fields__
        values = {k: v for k, v in cfg.items() if k in names}
        if isinstance(values.get("n_experts"), list):
            values["n_experts"] = tuple(values["n_experts"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (``n_experts`` as a list)."""
        return {**asdict(self), "n_experts": list(self.n_experts)}

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def eps(self) -> float:
        """Machine epsilon of the Jacobians' dtype, used by the rank tolerance."""
        return float(torch.finfo(self.torch_dtype).eps)
