"""The facts a result depends on besides its config: the code (the checkout's git commit), the
software (torch, CUDA, Lightning, Python), and the machine (device, CPU, torch threads).

- :func:`run_environment` -> :class:`RunEnvironment`: what a training run records in its summary
  (``device``, ``torch_threads``, ``torch_version``, ``lightning_version``, ``git_commit``);
- :func:`machine_environment`: what the bench records in ``bench.json``'s ``environment``;
- the single facts: :func:`git_commit`, :func:`device_name`, :func:`gpu_name`, :func:`cpu_model`,
  :func:`lightning_version`.

Imports: the standard library and torch (Lightning only to read its version, when asked).
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str | None:
    """The commit of the moe_lab checkout this code runs from, ``-dirty`` appended when tracked
    files differ from it (None for an installed wheel, or where git is missing or slow)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def gpu_name(device: torch.device) -> str | None:
    """The CUDA device's model name (e.g. ``NVIDIA H100 80GB HBM3``); None off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    """``str(device)``, with the GPU's model on CUDA: ``cpu``, ``cuda:0 (NVIDIA H100 ...)``."""
    gpu = gpu_name(device)
    return str(device) if gpu is None else f"{device} ({gpu})"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return cpu


def lightning_version() -> str:
    import lightning  # here, not at the top: importing Lightning takes seconds

    return lightning.__version__


@dataclass(frozen=True)
class RunEnvironment:
    """What a training run's result depends on besides its config; the field names are the
    run summary's."""

    device: str
    torch_threads: int
    torch_version: str
    lightning_version: str
    git_commit: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_environment(device: torch.device) -> RunEnvironment:
    """The facts of a run on ``device`` (e.g. ``trainer.strategy.root_device``)."""
    return RunEnvironment(
        device=device_name(device),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        lightning_version=lightning_version(),
        git_commit=git_commit(),
    )


def machine_environment(device: torch.device) -> dict[str, Any]:
    """Hardware and software that measurements on ``device`` were taken on (the bench's
    ``environment`` object: device, cpu_model, cpu_count, torch_threads, gpu, torch, cuda,
    lightning, python)."""
    return {
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning_version(),
        "python": platform.python_version(),
    }
