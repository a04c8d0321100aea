"""How the bench times things, and what this machine can do: copy bandwidth and GEMM rate.

Every figure is a set of callables measured side by side in one process: warm-up rounds, then
``repeats`` rounds in which each callable runs once, the order rotating every round so that drift
in the machine's load and order effects (caches, allocator) hit all alike. A figure's value is
the median of its rounds.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch


class Clock:
    """Wall-clock seconds on one device; on CUDA the queued work is waited for first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def per_call(self, fn: Callable[[], object], calls: int) -> float:
        """Mean seconds of ``calls`` back-to-back calls of ``fn``."""
        start = self.now()
        for _ in range(calls):
            fn()
        return (self.now() - start) / calls


def interleave(
    fns: Mapping[str, Callable[[], float]], *, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Each callable runs its work once and returns the seconds it measured. ``warmup`` rounds
    are discarded; in round ``i`` the callables start at position ``i mod n``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(float(fns[name]()))
    return samples


def time_calls(
    clock: Clock,
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    min_sample_s: float,
) -> tuple[dict[str, list[float]], int]:
    """Seconds per call of each of ``fns``, interleaved; each sample is the mean of ``inner``
    calls, enough for the fastest to run ``min_sample_s`` (timer jitter stays small against the
    work). Returns the samples and ``inner``."""
    for _ in range(warmup):  # first calls allocate; calibrate after them
        for fn in fns.values():
            fn()
    fastest = min(clock.per_call(fn, 1) for fn in fns.values())
    inner = int(min(1000, max(1, math.ceil(min_sample_s / max(fastest, 1e-9)))))
    timed = {name: (lambda fn=fn: clock.per_call(fn, inner)) for name, fn in fns.items()}
    return interleave(timed, warmup=0, repeats=repeats), inner


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def copy_bandwidth(clock: Clock, repeats: int, mib: int = 64) -> float:
    """Bytes per second of ``dst.copy_(src)`` on two ``mib`` MiB float32 tensors (larger than the
    last-level cache), counting bytes read plus bytes written."""
    src = torch.rand(mib * 2**18, device=clock.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = median([clock.per_call(lambda: dst.copy_(src), 1) for _ in range(repeats)])
    return 2 * src.numel() * src.element_size() / seconds


def gemm_rate(clock: Clock, repeats: int) -> float:
    """FLOP/s of one square float32 matmul (2 n^3 FLOPs; n = 1024 on CPU, 8192 on CUDA)."""
    n = 8192 if clock.device.type == "cuda" else 1024
    a, b = torch.rand(n, n, device=clock.device), torch.rand(n, n, device=clock.device)
    a @ b
    seconds = median([clock.per_call(lambda: a @ b, 1) for _ in range(repeats)])
    return 2 * n**3 / seconds


#: glibc's ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: the largest mmap threshold glibc takes on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``)
MMAP_THRESHOLD = 32 * 2**20
_NEVER_TRIM = 2**31 - 1


def pin_allocator() -> dict[str, int] | None:
    """Fix glibc malloc's thresholds for the rest of the process: blocks up to 32 MiB come from
    the heap, and freed heap memory is kept, never trimmed back to the OS.

    Why: by default glibc moves both thresholds with the sizes freed so far, so whether a side's
    tensors page-fault in afresh on every call depends on which other modules ran between its
    calls. Measured at the CIFAR L1 floor (B=32): 1,024-6,112 page faults a call and 18.6 ms
    beside one other module, none beside two; pinned, none and 14.3 ms in both. Blocks above
    32 MiB still get fresh pages on every call, as in any training loop.

    Returns the settings, or None where the C library is not glibc (nothing is changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return None
    if not libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM):
        return None
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": _NEVER_TRIM}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other processes' CPU use makes CPU timings noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
