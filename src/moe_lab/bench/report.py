"""Result rows, targets, the machine's description, and the bench.json / bench.md outputs."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_lab.utils.io import atomic_write_json, atomic_write_text

from .timing import PairSamples, median

__all__ = [
    "METRICS",
    "Target",
    "environment_info",
    "make_row",
    "render_markdown",
    "write_outputs",
]

#: ``time``: values are median seconds per call, lower is better; ``throughput``: values are
#: items (images) per second, higher is better. Either way ``ratio = candidate_value /
#: reference_value``.
METRICS = ("time", "throughput")


@dataclass(frozen=True)
class Target:
    """A limit on one field of a row: ``row[of] <op> value``.

    ``devices`` limits where the target applies (e.g. ``("cuda",)`` for a figure set for an
    H100); elsewhere the row is reported with result ``n/a``.
    """

    op: str
    value: float
    of: str = "ratio"
    devices: tuple[str, ...] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"Target op must be '<=' or '>=', got {self.op!r}")

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        sign = "≤" if self.op == "<=" else "≥"
        what = "" if self.of == "ratio" else f"{self.of} "
        return f"{what}{sign} {self.value:g}"

    def check(self, row: dict[str, Any]) -> bool | None:
        """True/False, or None where the target does not apply (another device, no value)."""
        if self.devices is not None and row["device"] not in self.devices:
            return None
        value = row.get(self.of)
        if value is None:
            return None
        return bool(value <= self.value) if self.op == "<=" else bool(value >= self.value)

    def to_json(self) -> dict[str, Any]:
        return {
            "of": self.of,
            "op": self.op,
            "value": self.value,
            "devices": None if self.devices is None else list(self.devices),
            "text": self.describe(),
        }


def make_row(
    *,
    section: str,
    name: str,
    candidate: str,
    reference: str,
    samples: PairSamples,
    metric: str,
    target: Target,
    device: torch.device,
    items_per_unit: int | None = None,
    inner: int = 1,
    note: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """One measured figure.

    ``samples`` hold seconds per unit (one call for layer figures, one training step for the
    training figures). ``candidate_s``/``reference_s`` are their medians; the values compared are
    those medians (``metric="time"``) or ``items_per_unit / median`` (``"throughput"``, items/s),
    and ``ratio = candidate_value / reference_value``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "throughput" and not items_per_unit:
        raise ValueError("a throughput figure needs items_per_unit (e.g. the batch size)")
    candidate_s = median(samples.candidate)
    reference_s = median(samples.reference)
    if metric == "time":
        candidate_value, reference_value, unit = candidate_s, reference_s, "s"
    else:
        assert items_per_unit is not None
        candidate_value = items_per_unit / candidate_s
        reference_value = items_per_unit / reference_s
        unit = "items/s"
    row: dict[str, Any] = {
        "section": section,
        "name": name,
        "candidate": candidate,
        "reference": reference,
        "metric": metric,
        "unit": unit,
        "candidate_s": candidate_s,
        "reference_s": reference_s,
        "candidate_value": candidate_value,
        "reference_value": reference_value,
        "ratio": candidate_value / reference_value,
        "items_per_unit": items_per_unit,
        "device": device.type,
        "repeats": samples.repeats,
        "warmup": samples.warmup,
        "inner": inner,
        "candidate_samples_s": list(samples.candidate),
        "reference_samples_s": list(samples.reference),
        "note": note,
    }
    row.update(extra)
    row["target"] = target.to_json()
    row["pass"] = target.check(row)
    return row


# -- the machine ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_commit() -> str | None:
    """The checkout's commit (with ``-dirty``), when the package runs from a git checkout."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_info(device: torch.device) -> dict[str, Any]:
    """Hardware and software the numbers were measured on."""
    import lightning

    try:
        usable_cores: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cores = None
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "gpu": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device": str(device),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


# -- outputs ----------------------------------------------------------------------------------------


def _fmt_value(row: dict[str, Any], which: str) -> str:
    value = row[f"{which}_value"]
    if row["metric"] == "time":
        if value >= 1.0:
            return f"{value:.3f} s"
        if value >= 1e-3:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e6:.1f} µs"
    return f"{value:,.0f} img/s"


def _result(row: dict[str, Any]) -> str:
    return {True: "pass", False: "**miss**", None: "n/a"}[row["pass"]]


def _loads(values: list[float] | None) -> str:
    return "n/a" if not values else "/".join(f"{v:g}" for v in values)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: what was measured where, then one table row per figure."""
    env, opts = report["environment"], report["options"]
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    lines = [
        "# moe_lab benchmark",
        "",
        f"- started {report['started']}, suite wall time {report['wall_time_s']:.1f} s",
        f"- device `{env['device']}`: CPU {env['cpu_model']} ({env['usable_cores']} usable of "
        f"{env['cpu_count']} cores){gpu}; torch threads {env['torch_threads']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), Lightning "
        f"{env['lightning']}, Python {env['python']}, commit {env['git_commit']}",
        f"- load average (1/5/15 min) at start {_loads(env.get('load_average_start'))}, at end "
        f"{_loads(env.get('load_average_end'))}: other processes' CPU use makes CPU timings noisy",
        f"- precision {opts['precision']}, channels_last {opts['channels_last']}, compile "
        f"{opts['compile']}, quick {opts['quick']}, full {opts['full']}",
        "- every figure: warm-up, then the median of the repeats, candidate and reference "
        "interleaved in the same process; ratio = candidate / reference (times: lower is better; "
        "img/s: higher is better)",
        "",
        "| fig | measurement | candidate | reference | ratio | target | result | repeats | notes |",
        "|---|---|---|---|---:|---|---|---:|---|",
    ]
    for row in report["rows"]:
        lines.append(
            "| "
            + " | ".join(
                _cell(str(c))
                for c in (
                    row["section"],
                    f"{row['name']}: {row['candidate']} vs {row['reference']}",
                    _fmt_value(row, "candidate"),
                    _fmt_value(row, "reference"),
                    f"{row['ratio']:.3f}",
                    row["target"]["text"],
                    _result(row),
                    row["repeats"],
                    row.get("note", ""),
                )
            )
            + " |"
        )
    for skip in report["skipped"]:
        lines.append(
            f"| {skip['section']} | {_cell(skip['name'])} | | | | {_cell(skip.get('target', ''))} "
            f"| skipped | | {_cell(skip['reason'])} |"
        )
    if report.get("notes"):
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.md`` in ``out_dir`` (each written atomically)."""
    json_path = atomic_write_json(out_dir / "bench.json", report)
    md_path = atomic_write_text(out_dir / "bench.md", render_markdown(report))
    return json_path, md_path
