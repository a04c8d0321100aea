"""Options, the per-run context every section receives, and what a section returns."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .timing import Clock

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "SECTIONS",
    "SECTION_TITLES",
    "BenchContext",
    "BenchOptions",
    "SectionResult",
    "resolve_device",
]

SECTIONS = ("a", "b", "c", "d", "e")
SECTION_TITLES = {
    "a": "MoE layers against their floor (forward + backward)",
    "b": "Lightning Trainer.fit against a plain PyTorch loop",
    "c": "real data path against one fixed in-memory batch",
    "d": "sparse routing (top_k) against a single expert",
    "e": "seed-protocol run (16 epochs x 50k CIFAR-shaped images, batch 32)",
}
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("32", "bf16-mixed")
#: the smallest number of repeats a figure may report
MIN_REPEATS = 5


@dataclass(frozen=True)
class BenchOptions:
    """What ``python -m moe_lab.bench`` was asked to do (see its ``--help``)."""

    device: str = "auto"
    only: tuple[str, ...] = SECTIONS
    quick: bool = False
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    full: bool = False
    threads: int | None = None
    repeats: int | None = None
    out: Path | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        unknown = [s for s in self.only if s not in SECTIONS]
        if unknown or not self.only:
            raise ValueError(
                f"--only takes a comma-separated subset of {','.join(SECTIONS)} "
                f"(e.g. --only a,b), got {','.join(self.only)!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.repeats is not None and self.repeats < MIN_REPEATS:
            raise ValueError(
                f"--repeats must be >= {MIN_REPEATS} (every figure is a median of at least "
                f"{MIN_REPEATS} repeats), got {self.repeats}"
            )


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is a ValueError."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda was requested but no CUDA device is available "
                f"(torch.cuda.is_available() is False; torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda}); run with --device cpu or --device auto"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class SectionResult:
    """Rows measured by one section, figures it skipped (with why), and notes for the report."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchContext:
    """Everything a section needs: the options, the device and its clock, the repeat counts and
    a scratch dir (checkpoints and logs of the training figures; deleted at the end)."""

    options: BenchOptions
    device: torch.device
    scratch: Path
    _compiled: dict[int, nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.clock = Clock(self.device)

    @property
    def quick(self) -> bool:
        return self.options.quick

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def repeats(self) -> int:
        if self.options.repeats is not None:
            return self.options.repeats
        return MIN_REPEATS if self.quick else 7

    @property
    def warmup(self) -> int:
        """Warm-up rounds of the layer figures (the training figures warm up by epochs/steps)."""
        if self.is_cuda or self.options.compile:
            return 3
        return 1 if self.quick else 2

    @property
    def min_sample_s(self) -> float:
        """Shortest timed sample of a layer figure: calls are repeated inside a sample up to
        this, so that timer and launch jitter stay small against the work."""
        if self.quick:
            return 0.01
        return 0.05 if not self.is_cuda else 0.02

    @property
    def lightning_precision(self) -> str:
        return "32-true" if self.options.precision == "32" else self.options.precision

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast for ``--precision bf16-mixed``, else nothing."""
        if self.options.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def maybe_compile(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module)`` under ``--compile`` (once per module per process), else the
        module itself."""
        if not self.options.compile:
            return module
        key = id(module)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(module)
        return self._compiled[key]

    def log(self, message: str) -> None:
        print(message, flush=True)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Send stdout and stderr (progress bars, Lightning's banners) to /dev/null for a while."""
    with (
        open(os.devnull, "w", encoding="utf-8") as null,
        contextlib.redirect_stdout(null),
        contextlib.redirect_stderr(null),
    ):
        yield
    sys.stdout.flush()
