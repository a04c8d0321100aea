"""The trackers' side of a run: each job's W&B run (name, group, id, hyperparameters, finish),
and a sweep's or comparison's report as one W&B run of its own (``job_type="report"``).

The jobs of a sweep are W&B runs of their own, named by :func:`moe_lab.run.labels.job_label`
and grouped as ``<experiment>/<sweep dir name>``; the report run, in the same group, holds what
the report concluded: the table (``summary.csv`` as a ``wandb.Table``), every figure (``*.png``
as images) and ``report.md`` (as a file of the run). Like the jobs it stays offline (files under
``<report_dir>/wandb/``) unless ``WANDB_MODE=online``; ``wandb sync <report_dir>/wandb/offline-run-*``
uploads it later.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from moe_lab.run.context import hydra_overrides, sweep_dir_of
from moe_lab.run.labels import job_label
from moe_lab.run.record import RunSummary
from moe_lab.run.report_files import REPORT_MD, SUMMARY_CSV
from moe_lab.run.resolvers import _wandb_offline
from moe_lab.run.sweep import varying_keys

log = logging.getLogger(__name__)

#: keys of the report run's logged items
TABLE_KEY = "report/summary"
FIGURE_KEY = "report/{stem}"


# -- each job's W&B run ---------------------------------------------------------------------


def run_name(cfg: DictConfig, summary: RunSummary) -> str:
    """The job's W&B name: its group's label, the overrides that vary across its sweep (every
    identifying override of a single run), then the seed, e.g. ``moe K=2 optimizer.lr=0.003
    seed=1``."""
    varying = varying_keys(sweep_dir_of(Path(cfg.paths.output_dir)))
    return job_label(summary.to_dict(), hydra_overrides(), varying)


def run_group(cfg: DictConfig) -> str:
    """The sweep a job belongs to (``<experiment>/<sweep dir name>``), or the experiment."""
    experiment = str(cfg.get("experiment_name"))
    sweep_dir = sweep_dir_of(Path(cfg.paths.output_dir))
    return experiment if sweep_dir is None else f"{experiment}/{sweep_dir.name}"


def _is_wandb_target(node: Any) -> bool:
    return OmegaConf.is_config(node) and str(node.get("_target_", "")).endswith(".WandbLogger")


def plan_wandb(cfg: DictConfig, summary: RunSummary, previous: RunSummary | None) -> None:
    """Name, group and id of this job's W&B run, where the config leaves them null."""
    loggers = cfg.get("logger") or {}
    for key in list(loggers):
        node = loggers[key]
        if not _is_wandb_target(node):
            continue
        with open_dict(node):
            if node.get("name") is None:
                node.name = run_name(cfg, summary)
            if node.get("group") is None:
                node.group = run_group(cfg)
            if node.get("id") is None and previous is not None and previous.wandb_id:
                node.id = previous.wandb_id  # a resumed run continues its W&B run


def finish_stray_wandb_run() -> None:
    """Lightning's WandbLogger adopts the process's open ``wandb.run``: a job must never start
    inside a run another job left open."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        log.warning("finishing a W&B run left open in this process (%s)", wandb.run.id)
        wandb.run.finish(exit_code=1)


def finish_wandb(loggers: Iterable[Any], summary: RunSummary) -> None:
    """Finish each W&B run of the job (exit code 0 for completed, 1 otherwise, so W&B marks it
    failed); the record's final fields are in its summary already (``log_final_record``)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        run = getattr(lg, "_experiment", None)
        if not isinstance(lg, WandbLogger) or run is None or not hasattr(run, "finish"):
            continue
        try:
            run.finish(exit_code=0 if summary.status == "completed" else 1)
        except Exception as err:  # W&B trouble must not cost the run's own record
            log.warning("could not finish the W&B run: %s: %s", type(err).__name__, err)
    finish_stray_wandb_run()


def log_hyperparams(loggers: Iterable[Any], cfg: DictConfig, summary: RunSummary) -> None:
    """The config and the model's size to every tracker; the W&B run id into the record."""
    for lg in loggers:
        lg.log_hyperparams(
            {
                "params": summary.params,
                "flops_per_example": summary.flops_per_example,
                "overrides": summary.overrides,
                "config": OmegaConf.to_container(cfg, resolve=True),
            }
        )
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "id"):
            summary.wandb_id = lg.experiment.id


# -- the report as a W&B run ----------------------------------------------------------------


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
    table_path = report_dir / SUMMARY_CSV
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
        report_md = report_dir / REPORT_MD
        if report_md.is_file():
            run.save(str(report_md), base_path=str(report_dir), policy="now")
        run.summary["report/n_runs"] = len(rows)
        run_dir = Path(run.dir).parent  # <report_dir>/wandb/<offline-run-...>
    finally:
        run.finish()
    log.info("report logged to W&B as run %s (%s)", run.id, run_dir)
    return run_dir


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


__all__ = [
    "FIGURE_KEY",
    "TABLE_KEY",
    "finish_stray_wandb_run",
    "finish_wandb",
    "log_hyperparams",
    "log_report_run",
    "log_report_run_if_wandb",
    "plan_wandb",
    "run_group",
    "run_name",
]
