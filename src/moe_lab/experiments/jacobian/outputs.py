"""A run's files: writing a :class:`JacobianResult` into a run dir, reading its record back, and
the end-of-run table. The files' names and the record's type are
:mod:`moe_lab.run.jacobian_record`'s."""

from __future__ import annotations

from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

from moe_lab.run.jacobian_record import (
    FIGURE_FILE,
    RECORD_FILE,
    RUN_FILES,
    SPECTRA_FILE,
    JacobianRecord,
)
from moe_lab.utils.io import atomic_write, atomic_write_text

from .compute import JacobianResult
from .plot import plot_jacobian_spectra
from .settings import JacobianSettings


def write_outputs(result: JacobianResult, output_dir: str | Path, **record: Any) -> dict[str, Path]:
    """Write the run dir's spectra table, figure and record atomically into ``output_dir``;
    returns their paths by file name.

    ``record`` sets the :class:`JacobianRecord`'s other fields (``wall_time_s``, ``run_dir``,
    ``overrides``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in RUN_FILES}
    atomic_write_text(paths[SPECTRA_FILE], result.spectra.to_csv(index=False))
    buf = BytesIO()
    plot_jacobian_spectra(result).savefig(buf, format="png", dpi=120)
    atomic_write(paths[FIGURE_FILE], lambda f: f.write(buf.getvalue()))
    JacobianRecord.from_result(result, **record).write(paths[RECORD_FILE])
    return paths


def record_from_dict(data: Mapping[str, Any]) -> JacobianRecord[JacobianSettings]:
    """:meth:`JacobianRecord.from_dict` with this experiment's settings."""
    return JacobianRecord.from_dict(data, JacobianSettings.from_config)


def read_record(path: str | Path) -> JacobianRecord[JacobianSettings]:
    """The record of a run (``path``: its record file, or the run dir holding one), with this
    experiment's settings."""
    return JacobianRecord.read(path, JacobianSettings.from_config)


def format_table(result: JacobianResult | JacobianRecord[Any]) -> str:
    """The end-of-run table, one line per model; ``singular``: share of singular Jacobians."""
    w = max(len("model"), *(len(label) for label in result.models))
    lines = [
        f"{'model':<{w}} {'num. rank':>10} {'eff. rank':>10} {'median cond':>12} {'singular':>9}"
    ]
    for label, m in result.models.items():
        cond = m.median_condition_number
        cond_s = "inf" if cond is None else f"{cond:.3g}"
        lines.append(
            f"{label:<{w}} {m.numerical_rank:>10.2f} {m.effective_rank:>10.2f} "
            f"{cond_s:>12} {m.singular_fraction:>9.0%}"
        )
    return "\n".join(lines)
