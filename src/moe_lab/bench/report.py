"""The bench's record: one :class:`Row` per figure, and its bench.json / bench.md renderings."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_lab.utils.io import atomic_write_json, atomic_write_text

from .measure import median


@dataclass
class Check:
    """A ratio (of the samples ``num`` and ``den`` where both are given) against a limit.

    ``limit`` None: reported, no target here (e.g. a GPU target on a CPU run). ``quartiles``: the
    first and third quartile of the per-round ratios (None below 2 rounds), so that a reader sees
    how far this run's own rounds spread around the median that the verdict is taken on."""

    value: float
    op: str = "<="
    limit: float | None = None
    num: str | None = None
    den: str | None = None
    quartiles: tuple[float, float] | None = None

    @property
    def passed(self) -> bool | None:
        if self.limit is None:
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit


@dataclass
class Row:
    """One figure: seconds of each measured side (``times``; medians of ``samples``, or derived
    from them, like a roofline), its ratios (``checks``) and what it was measured on (``info``)."""

    section: str
    name: str
    times: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, label: str, samples: list[float]) -> float:
        self.samples[label] = samples
        self.times[label] = median(samples)
        return self.times[label]

    def ratio(
        self, label: str, num: str, den: str, limit: float | None = None, op: str = "<="
    ) -> Check:
        """The median over rounds of ``num / den``: each round ran both sides back to back, so
        a burst of load from other processes mostly hits a round's both sides."""
        pairs = zip(self.samples[num], self.samples[den], strict=True)
        ratios = [a / b for a, b in pairs]
        spread = None
        if len(ratios) >= 2:
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            spread = (q1, q3)
        self.checks[label] = Check(median(ratios), op, limit, num, den, spread)
        return self.checks[label]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for label, check in self.checks.items():
            out["checks"][label]["passed"] = check.passed
        return out

    def progress(self) -> str:
        cells = [f"{k} {_seconds(v)}" for k, v in self.times.items()]
        cells += [f"{k} {_check(c)}" for k, c in self.checks.items()]
        return f"  {self.name}: " + ", ".join(cells).replace("**", "")


def _seconds(value: float) -> str:
    if value >= 1.0:
        return f"{value:.2f} s"
    return f"{value * 1e3:.2f} ms" if value >= 1e-3 else f"{value * 1e6:.0f} µs"


def _ratio(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _check(check: Check) -> str:
    value = _ratio(check.value)
    if check.quartiles is not None:
        value += " [" + "-".join(_ratio(q) for q in check.quartiles) + "]"
    if check.passed is None:
        return value
    text = f"{value} ({'≤' if check.op == '<=' else '≥'} {check.limit:g})"
    return text if check.passed else f"**{text} miss**"


def _allocator(settings: dict[str, int] | None) -> str:
    if settings is None:
        return "malloc: the C library's default thresholds."
    return (
        f"malloc pinned: blocks up to {settings['mmap_threshold'] // 2**20} MiB from the heap, "
        "never trimmed."
    )


def render_markdown(report: dict[str, Any], rows: list[Row], titles: dict[str, str]) -> str:
    """The machine, then one table per section: seconds per call (or step) of each side, and
    each ratio with its target (missed targets in bold)."""
    env, m = report["environment"], report["machine"]
    loads = f"{report['load_average_start']} at start, {report['load_average_end']} at end"
    lines = [
        f"moe_lab bench, {report['started']}, {report['wall_time_s']:.0f} s: {env['device']}, "
        f"CPU {env['cpu_model']} ({env['cpu_count']} cores, {env['torch_threads']} torch "
        f"threads){', GPU ' + env['gpu'] if env['gpu'] else ''}; torch {env['torch']}, "
        f"Lightning {env['lightning']}, Python {env['python']}.",
        "",
        f"Measured in this run: copy bandwidth {m['copy_bandwidth_GBps']:.1f} GB/s (read + "
        f"written), float32 GEMM {m['gemm_GFLOPs']:.1f} GFLOP/s. Load average (1/5/15 min) "
        f"{loads}. {_allocator(report.get('allocator'))} A time is the median over rounds, a "
        "ratio the median of the per-round ratios (in brackets their first and third "
        "quartiles: this run's own spread).",
    ]
    for section, title in titles.items():
        chosen = [r for r in rows if r.section == section]
        if not chosen:
            continue
        times = list(dict.fromkeys(k for r in chosen for k in r.times))
        checks = list(dict.fromkeys(k for r in chosen for k in r.checks))
        lines += ["", f"**{title}**", "", "| " + " | ".join(["measurement", *times, *checks])]
        lines[-1] += " |\n|---" + "|---:" * (len(times) + len(checks)) + "|"
        for r in chosen:
            cells = [r.name.replace("|", "/")]
            cells += [_seconds(r.times[k]) if k in r.times else "" for k in times]
            cells += [_check(r.checks[k]) if k in r.checks else "" for k in checks]
            lines.append("| " + " | ".join(cells) + " |")
    for err in report["errors"]:
        lines.append(f"\nsection {err['section']} failed: {err['error']}")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, report: dict[str, Any], markdown: str) -> None:
    atomic_write_json(out_dir / "bench.json", report)
    atomic_write_text(out_dir / "bench.md", markdown)
