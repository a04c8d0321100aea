"""Forward + backward time of Conv2dMoE against a plain Conv2d with out_channels * n_experts
channels (the same convolution FLOPs), that conv + ReLU, and conv + gate matmul (the MoE's two
GEMMs with no activation or mixing). CPU.

    .venv/bin/python scripts/time_layer.py [--batch 32] [--repeats 20] [--channels-last]

Prints the median (and min) wall time of each, the variants interleaved round by round so that
load from other processes hits them alike, and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_lab.layers import Conv2dMoE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    in_ch, out_ch, k, size = 3, 32, 2, (32, 32)
    moe = Conv2dMoE(
        in_ch,
        out_ch,
        k,
        3,
        size,
        padding="same",
        expert_activation="relu",
        gating_activation="softmax",
    )
    conv = nn.Conv2d(in_ch, out_ch * k, 3, padding=1)
    x = torch.rand(args.batch, in_ch, *size)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad_moe = torch.randn(args.batch, out_ch, *size)
    grad_conv = torch.randn(args.batch, out_ch * k, *size)
    gating = moe.gating_kernel.detach().reshape(-1, out_ch * k).requires_grad_()

    def run_moe() -> None:
        moe(x).backward(grad_moe)

    def run_conv() -> None:
        conv(x).backward(grad_conv)

    def run_conv_relu() -> None:
        torch.relu(conv(x)).backward(grad_conv)

    def run_conv_gate() -> None:
        hidden = F.conv2d(x, conv.weight, conv.bias, padding=1)
        logits = x.reshape(args.batch, -1) @ gating
        torch.autograd.backward([hidden, logits], [grad_conv, torch.ones_like(logits)])

    variants: dict[str, Callable[[], None]] = {
        "Conv2dMoE": run_moe,
        f"nn.Conv2d({in_ch}, {out_ch * k})": run_conv,
        "nn.Conv2d + ReLU": run_conv_relu,
        "conv + gate matmul": run_conv_gate,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    minima = {name: min(ts) * 1e3 for name, ts in times.items()}
    layout = "channels_last" if args.channels_last else "contiguous"
    print(
        f"forward+backward, batch {args.batch}, {layout} input, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}:"
    )
    for name, ms in medians.items():
        print(f"  {name:<22} {ms:8.2f} ms   (min {minima[name]:.2f} ms)")
    moe_ms, conv_ms, _, gate_ms = medians.values()
    print(f"ratio Conv2dMoE / nn.Conv2d: {moe_ms / conv_ms:.2f}")
    print(f"ratio Conv2dMoE / (conv + gate matmul): {moe_ms / gate_ms:.2f}")


if __name__ == "__main__":
    main()
