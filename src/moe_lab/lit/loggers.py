"""The final run record (``summary.json``'s fields) in each tracker's own place.

Per-epoch metrics reach the loggers through Lightning; the record of how a run ended (status,
best and last validation accuracy, test accuracy, epochs, wall time, ...) is known only after
``fit`` and ``test``, so :func:`log_final_record` hands it over once at the end:

- TensorBoard: the HParams tab, the run's hyperparameters together with the record's numbers as
  its metrics (``summary/<field>``) and its text fields as hyperparameters;
- MLflow: numbers as metrics ``summary/<field>``, text fields as tags ``summary/<field>``
  (params are write-once in MLflow; a resumed run would clash), and the MLflow run status
  FAILED / KILLED for a run that did not complete;
- W&B: the run's summary (``summary/<field>``, next to the last logged metrics);
- CSV: nothing (``summary.json`` is the record).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from lightning.pytorch.loggers import Logger

from moe_lab.run.record import RunSummary

log = logging.getLogger(__name__)

PREFIX = "summary/"
# summary fields that describe the run's provenance rather than its outcome, kept out of the
# trackers (they are long, and in summary.json)
_SKIP = ("overrides", "diverged_at", "error_message")
# MLflow's run status for a moe_lab status other than "completed"
_MLFLOW_STATUS = {"failed": "FAILED", "diverged": "FAILED", "interrupted": "KILLED"}


def record_fields(
    summary: RunSummary | Mapping[str, Any],
) -> tuple[dict[str, int | float], dict[str, str]]:
    """The record split into numbers (metrics) and text (tags/hyperparameters); nulls left out."""
    data = summary.to_dict() if isinstance(summary, RunSummary) else dict(summary)
    numbers: dict[str, int | float] = {}
    texts: dict[str, str] = {}
    for name, value in data.items():
        if value is None or name in _SKIP:
            continue
        if isinstance(value, bool):
            texts[name] = str(value)
        elif isinstance(value, int | float):
            numbers[name] = value
        else:
            texts[name] = str(value)
    return numbers, texts


def _tensorboard(logger: Any, numbers: dict[str, int | float], texts: dict[str, str]) -> None:
    # the hyperparameters logged at the start (lightning keeps them in ``logger.hparams``) plus
    # the record's text fields, with the record's numbers as the HParams metrics
    params = {**dict(logger.hparams), "summary": texts}
    logger.log_hyperparams(params, metrics={PREFIX + k: v for k, v in numbers.items()})
    logger.experiment.flush()


def _mlflow(
    logger: Any, numbers: dict[str, int | float], texts: dict[str, str], status: str
) -> None:
    client, run_id = logger.experiment, logger.run_id
    step = int(numbers.get("epochs", 0))
    for name, value in numbers.items():
        client.log_metric(run_id, PREFIX + name, float(value), step=step)
    for name, value in texts.items():
        client.set_tag(run_id, PREFIX + name, value[:5000])
    if status in _MLFLOW_STATUS:
        client.set_terminated(run_id, _MLFLOW_STATUS[status])


def _wandb(logger: Any, numbers: dict[str, int | float], texts: dict[str, str]) -> None:
    logger.experiment.summary.update({PREFIX + k: v for k, v in {**texts, **numbers}.items()})


def log_final_record(loggers: Iterable[Logger], summary: RunSummary) -> None:
    """Hand the finished run's record to every logger that has a place for it.

    A tracker that fails here is reported and skipped: the run's own record (``summary.json``)
    must still be written.
    """
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    numbers, texts = record_fields(summary)
    for logger in loggers:
        try:
            if isinstance(logger, TensorBoardLogger):
                _tensorboard(logger, numbers, texts)
            elif isinstance(logger, MLFlowLogger):
                _mlflow(logger, numbers, texts, summary.status)
            elif isinstance(logger, WandbLogger):
                _wandb(logger, numbers, texts)
        except Exception as err:  # a tracker's failure must not lose summary.json
            log.warning("could not log the run record to %s: %s", type(logger).__name__, err)


__all__ = ["PREFIX", "log_final_record", "record_fields"]
