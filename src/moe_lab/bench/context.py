"""What every bench section gets: :class:`Context`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .measure import Clock


@dataclass
class Context:
    """What every section gets: device and clock, repeat counts, this machine's measured copy
    bandwidth (B/s) and GEMM rate (FLOP/s), config overrides for the training sections, and a
    scratch dir (deleted at the end)."""

    device: torch.device
    quick: bool
    repeats: int
    overrides: list[str]
    scratch: Path
    bandwidth: float = 0.0
    gemm: float = 0.0
    clock: Clock = field(init=False)

    def __post_init__(self) -> None:
        self.clock = Clock(self.device)

    @property
    def warmup(self) -> int:
        return 3 if self.device.type == "cuda" else 1

    @property
    def min_sample_s(self) -> float:
        return 0.01 if self.quick else 0.05
