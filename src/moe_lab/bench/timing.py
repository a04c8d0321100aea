"""Clocks and the interleaved candidate/reference measurement every figure of the suite uses."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Clock", "PairSamples", "calibrate_inner", "interleave", "median"]


class Clock:
    """Wall-clock timing on one device.

    CPU: :func:`time.perf_counter`. CUDA: the device is synchronised before a mark is read, and
    :meth:`time_calls` brackets the calls with CUDA events, so queued kernels are counted where
    they run, not where they were launched.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"

    def sync(self) -> None:
        """Wait for the work queued on the device (no-op on CPU)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        """Seconds (perf_counter) after the device has finished its queued work."""
        self.sync()
        return time.perf_counter()

    def time_calls(self, fn: Callable[[], object], calls: int) -> float:
        """Seconds per call of ``fn``, averaged over ``calls`` back-to-back calls."""
        if calls < 1:
            raise ValueError(f"calls must be >= 1, got {calls}")
        if self.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / calls
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) / calls


def median(values: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def calibrate_inner(
    clock: Clock,
    fns: Sequence[Callable[[], object]],
    min_sample_s: float,
    max_inner: int = 1000,
) -> int:
    """Calls per timed sample so that the fastest of ``fns`` runs at least ``min_sample_s`` per
    sample (short samples are dominated by timer and launch jitter). One call of each ``fn`` is
    made; run the warm-up first."""
    fastest = min(clock.time_calls(fn, 1) for fn in fns)
    if fastest <= 0:
        return max_inner
    return int(min(max_inner, max(1, math.ceil(min_sample_s / fastest))))


@dataclass(frozen=True)
class PairSamples:
    """Per-repeat measurements (seconds per call or per step) of a candidate and its reference,
    taken alternately in the same process."""

    candidate: list[float]
    reference: list[float]
    warmup: int

    @property
    def repeats(self) -> int:
        return len(self.candidate)


def interleave(
    candidate: Callable[[], float],
    reference: Callable[[], float],
    *,
    warmup: int,
    repeats: int,
) -> PairSamples:
    """Measure ``candidate`` and ``reference`` side by side.

    Each callable runs its work once and returns the seconds it measured (per call or per step).
    ``warmup`` rounds of both run first and are discarded; then ``repeats`` rounds, alternating
    which one goes first (ABBA...), so that drift in the machine's load and order effects (caches,
    allocator, clocks) hit both alike.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        candidate()
        reference()
    cand: list[float] = []
    ref: list[float] = []
    for i in range(repeats):
        if i % 2 == 0:
            cand.append(float(candidate()))
            ref.append(float(reference()))
        else:
            ref.append(float(reference()))
            cand.append(float(candidate()))
    return PairSamples(candidate=cand, reference=ref, warmup=warmup)
