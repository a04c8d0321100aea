"""The command line and the suite runner."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .core import (
    DEVICES,
    PRECISIONS,
    SECTION_TITLES,
    SECTIONS,
    BenchContext,
    BenchOptions,
    SectionResult,
    resolve_device,
)
from .report import environment_info, render_markdown, write_outputs

__all__ = ["default_out_dir", "main", "parse_args", "run_bench"]


def _section_runners() -> dict[str, Callable[[BenchContext], SectionResult]]:
    # imported here: the training sections pull in Lightning and Hydra
    from .layers import run_layers, run_routing
    from .training import run_data_path, run_fit, run_seed_protocol

    return {
        "a": run_layers,
        "b": run_fit,
        "c": run_data_path,
        "d": run_routing,
        "e": run_seed_protocol,
    }


def default_out_dir() -> Path:
    """``outputs/bench/<timestamp>_<pid>`` under the current directory."""
    return Path("outputs") / "bench" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"


def _make_out_dir(out: Path | None) -> Path:
    path = out if out is not None else default_out_dir()
    if path.exists():
        raise FileExistsError(
            f"output dir {path} already exists; the bench never overwrites results: pass a new "
            "--out DIR (or leave --out out for outputs/bench/<timestamp>_<pid>)"
        )
    path.mkdir(parents=True)
    return path


def run_bench(options: BenchOptions) -> tuple[dict[str, Any], Path]:
    """Run the chosen sections, write ``bench.json`` and ``bench.md`` into a new output dir and
    return the report (the content of bench.json) and the dir.

    Raises:
        ValueError: ``--device cuda`` without CUDA (checked before anything is created).
        FileExistsError: the output dir exists already.
    """
    device = resolve_device(options.device)
    threads = options.threads
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as conf/trainer/gpu.yaml: static shapes
    out_dir = _make_out_dir(options.out)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    begin = time.perf_counter()
    report: dict[str, Any] = {
        "started": started,
        "wall_time_s": None,
        "options": {
            "device": options.device,
            "only": list(options.only),
            "quick": options.quick,
            "precision": options.precision,
            "channels_last": options.channels_last,
            "compile": options.compile,
            "full": options.full,
            "threads": threads,
            "repeats": options.repeats,
        },
        "environment": {**environment_info(device), "load_average_start": _load_average()},
        "rows": [],
        "skipped": [],
        "errors": [],
        "notes": [],
    }
    runners = _section_runners()
    print(f"moe_lab bench on {device} ({threads} torch threads) -> {out_dir}", flush=True)
    with tempfile.TemporaryDirectory(prefix="moe_bench_") as scratch:
        ctx = BenchContext(options=options, device=device, scratch=Path(scratch))
        for section in SECTIONS:
            if section not in options.only:
                continue
            print(f"[{section}] {SECTION_TITLES[section]}", flush=True)
            section_begin = time.perf_counter()
            try:
                result = runners[section](ctx)
            except Exception as err:  # one broken section must not lose the others' numbers
                traceback.print_exc()
                report["errors"].append(
                    {"section": section, "error": f"{type(err).__name__}: {err}"}
                )
                report["skipped"].append(
                    {
                        "section": section,
                        "name": SECTION_TITLES[section],
                        "reason": f"failed: {type(err).__name__}: {err}",
                    }
                )
                continue
            report["rows"] += result.rows
            report["skipped"] += result.skipped
            report["notes"] += result.notes
            print(f"[{section}] done in {time.perf_counter() - section_begin:.1f} s", flush=True)
    report["wall_time_s"] = time.perf_counter() - begin
    report["environment"]["load_average_end"] = _load_average()
    json_path, md_path = write_outputs(out_dir, report)
    print()
    print(render_markdown(report), end="")
    print(f"\nwrote {json_path} and {md_path}", flush=True)
    return report, out_dir


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: other processes' CPU use makes CPU timings noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _sections(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in SECTIONS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(SECTIONS)} (e.g. a,b), got {text!r}"
        )
    return tuple(dict.fromkeys(parts))


def _build_parser() -> argparse.ArgumentParser:
    sections = "\n".join(f"  {k}. {v}" for k, v in SECTION_TITLES.items())
    parser = argparse.ArgumentParser(
        prog="python -m moe_lab.bench",
        description=(
            "Benchmark suite: every figure is a ratio of a candidate against a reference "
            "measured side by side (interleaved repeats, median after warm-up) in this process. "
            "Writes bench.json and bench.md into the output dir and prints the table.\n\n"
            f"Sections:\n{sections}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output dir (must not exist); default outputs/bench/<timestamp>_<pid>",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: auto")
    parser.add_argument(
        "--only",
        type=_sections,
        default=SECTIONS,
        metavar="a,b,...",
        help=f"sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes and steps (5 repeats), for tests"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="32", help="default: 32")
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last inputs and weights (2D/3D)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the layers and networks (once each)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="section e runs the whole 16-epoch seed protocol instead of extrapolating",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the usable cores)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats per figure, >= 5 (default 7; quick 5)"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> BenchOptions:
    """Command line -> :class:`BenchOptions` (exits with status 2 on a bad argument)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return BenchOptions(
            device=args.device,
            only=tuple(args.only),
            quick=args.quick,
            precision=args.precision,
            channels_last=args.channels_last,
            compile=args.compile,
            full=args.full,
            threads=args.threads,
            repeats=args.repeats,
            out=args.out,
        )
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moe_lab.bench`` / ``moe-bench``. Returns 0, or 1 when a section failed;
    exits with status 2 on a bad argument, an unusable device or an existing output dir."""
    options = parse_args(argv)
    try:
        report, _ = run_bench(options)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return 1 if report["errors"] else 0
