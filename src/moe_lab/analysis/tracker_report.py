"""A sweep's or comparison's report as one W&B run (``job_type="report"``) in the sweep's group.

The jobs of a sweep are W&B runs of their own; this one holds what the report concluded: the
per-run table (``summary.csv`` as a ``wandb.Table``), every figure (``*.png`` as images) and
``report.md`` (as a file of the run). Like the jobs it stays offline (files under
``<report_dir>/wandb/``) unless ``WANDB_MODE=online``; ``wandb sync <report_dir>/wandb/offline-run-*``
uploads it later.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from moe_lab.utils.resolvers import _wandb_offline

log = logging.getLogger(__name__)

TABLE_FILE = "summary.csv"
REPORT_FILE = "report.md"
#: keys of the logged items
TABLE_KEY = "report/summary"
FIGURE_KEY = "report/{stem}"


def _read_table(path: Path) -> tuple[list[str], list[list[Any]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path} is empty: rebuild the report first (python -m moe_lab.report)")
    columns, data = rows[0], rows[1:]

    def cell(value: str) -> Any:
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return None if value == "" else value

    return columns, [[cell(v) for v in row] for row in data]


def log_report_run(
    report_dir: str | Path,
    group: str,
    project: str = "moe_lab",
    name: str | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Log ``report_dir``'s table and figures as one W&B run; return the run's local dir.

    Args:
        report_dir: a sweep or comparison dir holding ``summary.csv``, figures and ``report.md``.
        group: the W&B group of the sweep's jobs (their ``experiment_name``).
        project: the W&B project (the jobs' ``logger.wandb.project``).
        name: the run's display name (default ``report-<group>``).
        config: extra facts to record in the run's config (e.g. the baseline).
    """
    import wandb

    report_dir = Path(report_dir)
    table_path = report_dir / TABLE_FILE
    if not table_path.is_file():
        raise FileNotFoundError(
            f"{table_path} does not exist: log_report_run needs a built report "
            f"(python -m moe_lab.report {report_dir})"
        )
    columns, rows = _read_table(table_path)
    run = wandb.init(
        project=project,
        group=group,
        job_type="report",
        name=name or f"report-{group}",
        dir=str(report_dir),
        mode="offline" if _wandb_offline() else "online",
        config={"report_dir": str(report_dir), **(config or {})},
        reinit="create_new",
    )
    try:
        items: dict[str, Any] = {TABLE_KEY: wandb.Table(columns=columns, data=rows)}
        for figure in sorted(report_dir.glob("*.png")):
            items[FIGURE_KEY.format(stem=figure.stem)] = wandb.Image(str(figure))
        run.log(items)
        report_md = report_dir / REPORT_FILE
        if report_md.is_file():
            run.save(str(report_md), base_path=str(report_dir), policy="now")
        run.summary["report/n_runs"] = len(rows)
        run_dir = Path(run.dir).parent  # <report_dir>/wandb/<offline-run-...>
    finally:
        run.finish()
    log.info("report logged to W&B as run %s (%s)", run.id, run_dir)
    return run_dir


__all__ = ["log_report_run"]


def log_report_run_if_wandb(config: Any, report_dir: str | Path) -> Path | None:
    """At the end of a multirun whose jobs log to W&B (a ``WandbLogger`` in ``config.logger``),
    log its report as one ``job_type="report"`` run in the jobs' group
    (``<experiment_name>/<sweep dir name>``). A tracker failure is reported, never fatal: the
    report on disk is the record."""
    loggers = config.get("logger") or {}
    nodes = [n for n in loggers.values() if str(n.get("_target_", "")).endswith(".WandbLogger")]
    if not nodes:
        return None
    report_dir = Path(report_dir)
    group = f"{config.get('experiment_name')}/{report_dir.name}"
    try:
        return log_report_run(report_dir, group=group, project=str(nodes[0].get("project")))
    except Exception as err:  # the sweep's result does not depend on the tracker
        log.warning("the report was not logged to W&B (%s: %s)", type(err).__name__, err)
        return None
