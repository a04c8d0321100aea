"""Train one model: ``python -m moe_lab.train [overrides]`` (``moe-train``); ``-m`` for sweeps.

Every run ends with ``summary.json`` in its output dir, whatever happened: status ``completed``,
``failed`` (with the error), ``diverged`` (with the epoch and step) or ``interrupted`` (SIGTERM or
SIGINT; the last epoch's checkpoint is kept and ``resume=RUN_DIR`` continues it). While it runs the
record says ``running`` and is rewritten after every epoch, so a run killed with SIGKILL still shows
how far it got. A failing job never stops the other jobs of a sweep; the sweep's report lists it and
the multirun exits non-zero at the end. A signal stops the whole sweep: the running jobs record
``interrupted``, the jobs not yet started are left for the report to list as missing, and the
multirun exits with ``128 + signal``.

A resume that cannot continue the same run (a different config, a missing or unreadable checkpoint)
is refused before anything in the run dir changes: the reason goes to stderr and the exit is 2.

This module only composes, instantiates and fits: the run's record and its statuses are
:mod:`moe_lab.run.task`'s, signals :mod:`moe_lab.run.signals`'s, the trackers
:mod:`moe_lab.run.trackers`'s.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from moe_lab import console
from moe_lab.assembly import RunParts, assemble_run
from moe_lab.config import (
    CONFIG_DIR,
    ConfigError,
    ResumeRefused,
    check_resume,
    require_config_dir,
    validate_train_config,
)
from moe_lab.lit.loggers import log_final_record
from moe_lab.models import routing_variant
from moe_lab.run import trackers
from moe_lab.run.context import group_choice, hydra_overrides, is_main_process, is_multirun
from moe_lab.run.environment import run_environment
from moe_lab.run.record import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    RunSummary,
    summary_path,
    write_predictions,
)
from moe_lab.run.signals import RunInterrupted, SweepSignals, in_sweep_launcher, received_signal
from moe_lab.run.task import (
    EpochRecord,
    SegmentRecord,
    discard_unstarted_job_dir,
    drop_resume_record,
    exit_code,
    previous_segment,
    run_task,
)
from moe_lab.run.trackers import run_name
from moe_lab.utils.io import remove_stale_tmp_files

#: The model facts (``moe_lab.models.ModelFacts``) the run record copies.
_RECORDED_FACTS = ("params", "flops_per_example", "n_experts", "width_multiplier", "match",
                   "match_target")  # fmt: skip


def initial_summary(cfg: DictConfig, run_dir: Path) -> RunSummary:
    """The run record as the config describes the run, before anything is built."""
    model_cfg = cfg.get("model") or {}
    experts_cfg = cfg.get("experts") or {}
    moe_kwargs = experts_cfg.get("moe_kwargs") or {}
    uses_experts = model_cfg.get("kind") != "cnn" or model_cfg.get("match")
    return RunSummary(
        experiment=cfg.get("experiment_name"),
        model=model_cfg.get("name"),
        data=group_choice("data"),
        n_experts=experts_cfg.get("n_experts") if uses_experts else None,
        top_k=moe_kwargs.get("top_k"),
        routing=routing_variant(moe_kwargs),
        seed=cfg.get("seed"),
        stage=cfg.get("stage"),
        arm=cfg.get("arm"),
        trial=cfg.get("trial"),
        replicate=cfg.get("replicate"),
        max_epochs=(cfg.get("trainer") or {}).get("max_epochs"),
        status="running",
        run_dir=str(run_dir),
        overrides=hydra_overrides(),
    )


def _resume_point(cfg: DictConfig, run_dir: Path) -> tuple[str | None, RunSummary | None]:
    """The checkpoint and record a ``resume=`` continues (``(None, None)`` for a fresh run).

    Raises:
        ResumeRefused: the resume cannot continue the run; nothing in its dir was changed.
    """
    if not cfg.get("resume"):
        return None, None
    try:
        validate_train_config(cfg)
        ckpt_path = check_resume(cfg, run_dir)
    except ConfigError as err:
        drop_resume_record(run_dir)
        raise err if isinstance(err, ResumeRefused) else ResumeRefused(str(err)) from None
    return ckpt_path, previous_segment(run_dir)


def _fit_and_test(parts: RunParts, cfg: DictConfig, ckpt_path: str | None) -> float | None:
    """Fit, then score the test set once (unless ``test=false``); the test accuracy or None."""
    parts.trainer.fit(
        parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True
    )
    if not cfg.get("test", True):
        return None
    # With a held-out validation split the test set is scored once, with the checkpoint that
    # validation chose; without one (the original's protocol) validation IS the test set.
    held_out = float(cfg.data.get("val_split", 0.0) or 0.0) > 0
    # fast_dev_run (or no checkpoint callback) saves no best checkpoint to test
    has_best = not parts.trainer.fast_dev_run and parts.trainer.checkpoint_callback
    parts.trainer.test(
        parts.module,
        datamodule=parts.datamodule,
        ckpt_path="best" if held_out and has_best else None,
        weights_only=True,
        verbose=False,
    )
    if parts.module.test_predictions is not None and is_main_process():
        write_predictions(Path(cfg.paths.output_dir), *parts.module.test_predictions)
    return parts.module.test_result.get("test_acc")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and return its summary (also written to disk).

    Raises:
        ResumeRefused: ``resume=`` cannot continue the run; nothing in its dir was changed.
    """
    run_dir = Path(cfg.paths.output_dir)
    summary = initial_summary(cfg, run_dir)
    if received_signal() is not None:  # a signal stopped this sweep: start no further job
        summary.status = "interrupted"
        summary.error_message = "not started: the sweep was stopped by a signal"
        discard_unstarted_job_dir(run_dir)
        return summary.to_dict()
    ckpt_path, previous = _resume_point(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        remove_stale_tmp_files(run_dir, subdirs=(CHECKPOINT_DIR,))
    console.start_run(cfg, run_dir)  # noise filters, config tree to the run's log
    record = SegmentRecord(summary, run_dir, previous)
    parts: RunParts | None = None

    def report() -> None:  # the final record in each tracker's own place
        if parts is not None and is_main_process():
            record.take_history(parts.module.history) if parts.module.history else None
            log_final_record(parts.trainer.loggers, summary)

    def close() -> None:
        trackers.finish_wandb(parts.loggers if parts is not None else [], summary)
        if is_main_process():
            console.end_run(summary.to_dict())  # the end-of-run line

    with run_task(record, report=report, close=close):
        if not cfg.get("resume"):
            validate_train_config(cfg)
        trackers.plan_wandb(cfg, summary, previous)
        trackers.finish_stray_wandb_run()
        quiet = {"enable_progress_bar": False, "enable_model_summary": False}
        parts = assemble_run(cfg, **(quiet if is_multirun() else {}))
        parts.trainer.callbacks.append(EpochRecord(record))
        summary.data = parts.datamodule.name
        for key in _RECORDED_FACTS:
            setattr(summary, key, getattr(parts.facts, key))
        for key, value in run_environment(parts.trainer.strategy.root_device).to_dict().items():
            setattr(summary, key, value)
        parts.module.metrics_path = run_dir / METRICS_FILE
        trackers.log_hyperparams(parts.loggers, cfg, summary)
        record.write()
        summary.test_acc = _fit_and_test(parts, cfg, ckpt_path)
    return summary.to_dict()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ResumeRefused as err:
        print(f"error: resume refused: {err}", file=sys.stderr)
        if not is_multirun():
            sys.exit(2)
        return None
    # in the launching process (basic launcher) the sweep stops here; a joblib worker returns
    # and starts no further job, and the launching process exits once its workers are done
    stopped = summary["status"] == "interrupted" and received_signal() is not None
    if stopped and is_multirun() and in_sweep_launcher():
        raise SystemExit(exit_code(summary))
    if summary["status"] != "completed" and not is_multirun():
        print(
            f"error: run {summary['status']}: {summary['error_type']}: {summary['error_message']} "
            f"(summary in {summary_path(Path(summary['run_dir']))})",
            file=sys.stderr,
        )
        sys.exit(exit_code(summary))
    return summary.get("val_acc_best")


def main() -> None:
    """Entry point of ``python -m moe_lab.train`` and ``moe-train``."""
    require_config_dir("train")  # one line saying what to do, not Hydra's error, without configs
    _hydra_main()


__all__ = [
    "ConfigError",
    "ResumeRefused",
    "RunInterrupted",
    "SweepSignals",
    "main",
    "run_name",
    "train",
]

if __name__ == "__main__":
    # Run the package's module, not this ``__main__`` copy of it: joblib's workers import the task
    # function by its module's name.
    from moe_lab.train import main as _main

    _main()
