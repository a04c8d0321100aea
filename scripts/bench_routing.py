"""Sparse routing against one expert: does top-1 of 16 experts cost about what one expert costs?

Times forward + backward of

- ``Conv2dMoE(n_experts=16, top_k=1, gate_input="pooled")`` against the same layer with
  ``n_experts=1`` (CIFAR-like: B=32, C=32, 32x32 input, 32 filters, 3x3, 'same'), and
- ``DenseMoE(n_experts=16, top_k=1)`` against ``DenseMoE(n_experts=1)`` (B=256, 512 -> 512),

relu experts and softmax gates (the MoE model's defaults), in one process: each pair is warmed
up, then timed in interleaved repeats (candidate, reference, candidate, ...), and the ratio is
the median over repeats of candidate / reference time. The issue's target is a ratio <= 1.5.

    python scripts/bench_routing.py [--repeats 9] [--threads N] [--dense-batch 256] [--json FILE]

Each backward produces fresh ``.grad`` tensors (as ``optimizer.zero_grad(set_to_none=True)``
leaves them), so the 16 experts' 16x larger weight gradient is part of the cost.

Reading the numbers. Top-1 routing makes the experts' multiply-adds independent of K, but not
the bytes: every step reads all K experts' weights twice (forward, input gradient) and writes
their K-fold gradient. The conv layer is compute-bound (its weights are small next to its
activations) and lands near 1x. The dense layer at B=256 has 16 rows per expert: its 16 MB of
weights and 16 MB of fresh gradient dominate, and on CPU each fresh multi-MB tensor also pays
page faults (glibc returns large blocks to the OS; setting ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` or torch's ``THP_MEM_ALLOC_ENABLE=1`` shrinks that share). The
dense ratio falls as the rows per expert grow: try ``--dense-batch 1024`` or ``2048``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_lab.layers import Conv2dMoE, DenseMoE

TARGET = 1.5
N_EXPERTS = 16
LAYER_OPTIONS: dict[str, Any] = {"expert_activation": "relu", "gating_activation": "softmax"}


def conv_pair(batch: int) -> tuple[nn.Module, nn.Module, tuple[int, ...], str]:
    """(candidate, reference, input shape, description) for the conv comparison."""

    def build(n_experts: int) -> nn.Module:
        return Conv2dMoE(
            32, 32, n_experts, 3, None, padding="same", top_k=1, gate_input="pooled",
            **LAYER_OPTIONS,
        )  # fmt: skip

    description = f"Conv2dMoE B={batch} C=32 32x32 out=32 3x3"
    return build(N_EXPERTS), build(1), (batch, 32, 32, 32), description


def dense_pair(batch: int) -> tuple[nn.Module, nn.Module, tuple[int, ...], str]:
    """(candidate, reference, input shape, description) for the dense comparison."""
    candidate = DenseMoE(512, 512, N_EXPERTS, top_k=1, **LAYER_OPTIONS)
    reference = DenseMoE(512, 512, 1, **LAYER_OPTIONS)
    return candidate, reference, (batch, 512), f"DenseMoE B={batch} 512->512"


def fwd_bwd(layer: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    """One training-like step without the optimizer: forward, backward to fresh gradients."""

    def step() -> None:
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(grad)

    return step


def interleaved_ratio(
    candidate: Callable[[], None],
    reference: Callable[[], None],
    repeats: int,
    min_time_s: float,
) -> dict[str, Any]:
    """Warm both up, then ``repeats`` interleaved measurements of each (each the mean of as
    many calls as fill ``min_time_s``); the median of the per-repeat ratios."""
    for fn in (candidate, reference, candidate, reference):
        fn()
    start = time.perf_counter()
    reference()
    inner = max(1, round(min_time_s / max(time.perf_counter() - start, 1e-6)))
    times: dict[str, list[float]] = {"candidate": [], "reference": []}
    for _ in range(repeats):
        for name, fn in (("candidate", candidate), ("reference", reference)):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    ratios = [c / r for c, r in zip(times["candidate"], times["reference"], strict=True)]
    return {
        "candidate_ms": statistics.median(times["candidate"]) * 1e3,
        "reference_ms": statistics.median(times["reference"]) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "repeats": repeats,
        "calls_per_repeat": inner,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats (>= 5)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--conv-batch", type=int, default=32, help="conv comparison batch")
    parser.add_argument("--dense-batch", type=int, default=256, help="dense comparison batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5 for a meaningful median, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")

    results = []
    for make_pair, batch in ((conv_pair, args.conv_batch), (dense_pair, args.dense_batch)):
        torch.manual_seed(args.seed)
        candidate, reference, shape, description = make_pair(batch)
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn_like(reference(x))
        row = interleaved_ratio(
            fwd_bwd(candidate, x, grad), fwd_bwd(reference, x, grad), args.repeats, args.min_time
        )
        row["layer"] = description
        row["candidate"] = f"n_experts={N_EXPERTS}, top_k=1"
        row["reference"] = "n_experts=1"
        row["meets_target"] = row["ratio"] <= TARGET
        results.append(row)
        print(
            f"{description}: top-1 of {N_EXPERTS} {row['candidate_ms']:.2f} ms, one expert "
            f"{row['reference_ms']:.2f} ms, ratio {row['ratio']:.2f} "
            f"(range {row['ratio_min']:.2f}-{row['ratio_max']:.2f} over {args.repeats} repeats; "
            f"target <= {TARGET}: {'met' if row['meets_target'] else 'missed'})"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
