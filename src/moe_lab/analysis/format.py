"""The reports' formatters, one set for every report: numbers, p values, durations, markdown
cells and tables. Undefined values (None, NaN, an SE with n = 1) show as :data:`DASH`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from moe_lab.run.labels import is_present

DASH = "–"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def missing(value: Any) -> bool:
    """None, NaN or pandas' NA."""
    return not is_present(value)


def fmt_pct(mean: Any, se: Any = None, *, with_se: bool = True, digits: int = 2) -> str:
    """``"73.12 ± 0.41"``: a fraction's mean (and SE) in percent; "–" when undefined."""
    if missing(mean):
        return DASH
    text = f"{100 * float(mean):.{digits}f}"
    if not with_se:
        return text
    return f"{text} ± {DASH if missing(se) else f'{100 * float(se):.{digits}f}'}"


def fmt_int(value: Any) -> str:
    """``"1,250,858"``; "–" when missing."""
    return DASH if missing(value) else f"{round(float(value)):,}"


def fmt_float(value: Any, digits: int) -> str:
    """Fixed-point with ``digits`` decimals; "–" when missing."""
    return DASH if missing(value) else f"{float(value):.{digits}f}"


def fmt_p(value: Any) -> str:
    """A p-value with 3 significant digits (``"0.0312"``, ``"4.2e-06"``); "–" when undefined."""
    return DASH if missing(value) else f"{float(value):.3g}"


def fmt_signed(value: Any, digits: int = 1) -> str:
    """``"+1.2"`` / ``"−0.4"`` (a true minus sign); "–" when missing."""
    if missing(value):
        return DASH
    return f"{float(value):+.{digits}f}".replace("-", "−")


def fmt_ci(low: Any, high: Any, *, signed: bool = False, digits: int = 2) -> str:
    """A confidence interval of a difference of fractions, in percentage points:
    ``"[-1.20, 0.40]"`` (``signed``: ``"[−1.20, +0.40]"``); "–" when undefined."""
    if missing(low) or missing(high):
        return DASH
    if signed:
        return f"[{fmt_signed(100 * low, digits)}, {fmt_signed(100 * high, digits)}]"
    return f"[{100 * float(low):.{digits}f}, {100 * float(high):.{digits}f}]"


def fmt_value(value: Any) -> str:
    """A hyperparameter value: floats with 3 significant digits, anything else as it is."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def fmt_duration(seconds: Any) -> str:
    """``"45 s"``, ``"11 min 17 s"``, ``"2 h 05 min"``; "–" when missing."""
    if missing(seconds):
        return DASH
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def cell(value: Any, limit: int = 300) -> str:
    """One markdown table cell: one line, no terminal colour codes, ``|`` escaped, capped."""
    text = DASH if missing(value) or value == "" else str(value)
    text = " ".join(_ANSI_ESCAPE.sub("", text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(header: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> str:
    """A markdown table; the columns in ``right`` are right-aligned (numbers)."""
    right = set(right)
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = [
    "DASH",
    "cell",
    "fmt_ci",
    "fmt_duration",
    "fmt_float",
    "fmt_int",
    "fmt_p",
    "fmt_pct",
    "fmt_signed",
    "fmt_value",
    "missing",
    "table",
]
