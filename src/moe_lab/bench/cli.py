"""``python -m moe_lab.bench``: the command line and the section runner."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_lab.run.environment import machine_environment

from .context import Context
from .measure import copy_bandwidth, gemm_rate, load_average, pin_allocator
from .report import Row, render_markdown, write_outputs

SECTIONS = {
    "layers": "MoE layers against their floor, their roofline and the naive port of the original",
    "peers": "moe_lab against what users would pick instead (timm CondConv2d, a per-expert loop)",
    "capacity": "top-k with expert capacity (static shapes), eager and compiled, against the "
    "per-expert loop dropping the same overflow",
    "routing": "sparse routing: K=16 experts, top-k, against k dense experts and all 16",
    "lightning": "Trainer.fit against a plain PyTorch loop (the mnist1d step, composed config)",
    "original": "the original's CIFAR-10 protocol: measured steps, projected run time",
}


def _runners() -> dict[str, Callable[[Context], Iterable[Row]]]:
    from .layers import run_capacity, run_layers, run_peers, run_routing  # late: Lightning is slow
    from .training import run_lightning, run_original

    return {
        "layers": run_layers,
        "peers": run_peers,
        "capacity": run_capacity,
        "routing": run_routing,
        "lightning": run_lightning,
        "original": run_original,
    }


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was requested but no CUDA device is available; run with --device cpu"
        )
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_bench(args: argparse.Namespace) -> tuple[dict[str, Any], list[Row]]:
    """Run the chosen sections; write bench.json and bench.md into ``args.out`` (a new dir)."""
    device = resolve_device(args.device)
    if args.overrides and {"lightning", "original"} & set(args.only):
        from moe_lab.config import compose_config

        try:  # a bad override is refused here, before anything is measured
            compose_config(list(args.overrides), output_dir=tempfile.gettempdir())
        except Exception as err:
            raise ValueError(f"config overrides {list(args.overrides)}: {err}") from None
    out = args.out or Path(
        "outputs", "bench", f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"
    )
    if out.exists():
        raise FileExistsError(f"output dir {out} already exists: pass a new --out DIR")
    out.mkdir(parents=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = pin_allocator() if args.malloc == "pinned" else None
    begin = time.perf_counter()
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": machine_environment(device),
        "allocator": allocator,
        "load_average_start": load_average(),
        "errors": [],
    }
    repeats = args.repeats or (5 if args.quick else 7)
    rows: list[Row] = []
    runners = _runners()
    with tempfile.TemporaryDirectory(prefix="moe_bench_") as scratch:
        ctx = Context(device, args.quick, repeats, list(args.overrides), Path(scratch))
        ctx.bandwidth, ctx.gemm = copy_bandwidth(ctx.clock, repeats), gemm_rate(ctx.clock, repeats)
        report["machine"] = {
            "copy_bandwidth_GBps": ctx.bandwidth / 1e9,
            "gemm_GFLOPs": ctx.gemm / 1e9,
        }
        print(f"moe_lab bench on {device}, {torch.get_num_threads()} threads -> {out}", flush=True)
        for section in args.only:
            print(f"[{section}] {SECTIONS[section]}", flush=True)
            try:
                for row in runners[section](ctx):
                    rows.append(row)
                    print(row.progress(), flush=True)
            except Exception as err:  # one broken section must not lose the others' numbers
                traceback.print_exc()
                report["errors"].append(
                    {"section": section, "error": f"{type(err).__name__}: {err}"}
                )
    report["wall_time_s"] = time.perf_counter() - begin
    report["load_average_end"] = load_average()
    report["rows"] = [r.to_json() for r in rows]
    markdown = render_markdown(report, rows, SECTIONS)
    write_outputs(out, report, markdown)
    print("\n" + markdown + f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}", flush=True)
    return report, rows


def _sections(text: str) -> list[str]:
    parts = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not parts or any(p not in SECTIONS for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(SECTIONS)}, got {text!r}"
        )
    return parts


def _at_least(low: int, why: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{why}, got {text}")
        return int(text)

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    sections = "\n".join(f"  {k}: {v}" for k, v in SECTIONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m moe_lab.bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="moe_lab against its floor, its roofline and its peers, measured side by "
        f"side in one process; writes bench.json and bench.md.\n\nsections:\n{sections}",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides for the training "
        "sections, as moe_lab.train takes them (e.g. trainer.precision=bf16-mixed)",
    )
    parser.add_argument("--out", type=Path, help="new output dir (default outputs/bench/<time>)")
    parser.add_argument("--only", type=_sections, default=list(SECTIONS), metavar="A,B")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and steps (tests)")
    parser.add_argument("--threads", type=_at_least(1), help="torch threads (default: torch's)")
    parser.add_argument(
        "--malloc",
        choices=("pinned", "default"),
        default="pinned",
        help="pinned (default): glibc malloc's mmap and trim thresholds fixed, so that no side's "
        "page faults depend on the others (see moe_lab.bench.measure.pin_allocator); default: "
        "glibc's adaptive thresholds",
    )
    parser.add_argument(
        "--repeats",
        type=_at_least(5, " (a median of >= 5)"),
        help="repeats per figure (default 7, quick 5)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 0, or 1 when a section failed; 2 on an unusable device or an existing --out."""
    args = parse_args(argv)
    try:
        report, _ = run_bench(args)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if report["errors"] else 0
