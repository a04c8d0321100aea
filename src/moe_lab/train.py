"""Train one model: ``python -m moe_lab.train [overrides]`` (``moe-train``); ``-m`` for sweeps.

Every run ends with ``summary.json`` in its output dir, whatever happened: status ``completed``,
``failed`` (with the error) or ``diverged`` (with the epoch and step). A failing job never stops the
other jobs of a sweep; the sweep's report lists it and the multirun exits non-zero at the end.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moe_lab import console
from moe_lab.assembly import RunParts, assemble_run
from moe_lab.config import (
    CONFIG_DIR,
    ConfigError,
    check_resume,
    require_config_dir,
    validate_train_config,
)
from moe_lab.layers import MoEBase
from moe_lab.lit import DivergedError
from moe_lab.lit.loggers import log_final_record
from moe_lab.models import ModelFacts
from moe_lab.record import METRICS_FILE, SUMMARY_FILE, RunSummary
from moe_lab.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("moe_lab.train")


def _hydra_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (e.g. called from a notebook)
        return []


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _is_main_process() -> bool:
    return rank_zero_only.rank == 0


def _group_choice(group: str) -> str | None:
    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        return None


# Routing options that differ from the layers' own defaults name a variant in the report
# (``top_k`` has a field of its own).
_ROUTING_OPTIONS = ("noisy_gating", "gate_input", "expert_backend")


def _routing_variant(moe_kwargs: Any) -> str | None:
    """E.g. ``"gate_input=pooled,noisy_gating=True"``; None for the original's routing."""
    defaults = inspect.signature(MoEBase.__init__).parameters
    changed = [
        f"{key}={moe_kwargs[key]}"
        for key in _ROUTING_OPTIONS
        if key in moe_kwargs and moe_kwargs[key] != defaults[key].default
    ]
    return ",".join(changed) or None


def _initial_summary(cfg: DictConfig, run_dir: Path) -> RunSummary:
    model_cfg = cfg.get("model") or {}
    experts_cfg = cfg.get("experts") or {}
    moe_kwargs = experts_cfg.get("moe_kwargs") or {}
    uses_experts = model_cfg.get("kind") != "cnn" or model_cfg.get("match")
    return RunSummary(
        experiment=cfg.get("experiment_name"),
        model=model_cfg.get("name"),
        data=_group_choice("data"),
        n_experts=experts_cfg.get("n_experts") if uses_experts else None,
        top_k=moe_kwargs.get("top_k"),
        routing=_routing_variant(moe_kwargs),
        seed=cfg.get("seed"),
        stage=cfg.get("stage"),
        arm=cfg.get("arm"),
        trial=cfg.get("trial"),
        max_epochs=(cfg.get("trainer") or {}).get("max_epochs"),
        status="running",
        run_dir=str(run_dir),
        overrides=_hydra_overrides(),
    )


def _record_facts(summary: RunSummary, facts: ModelFacts) -> None:
    summary.params = facts.params
    summary.flops_per_example = facts.flops_per_example
    summary.n_experts = facts.n_experts
    summary.width_multiplier = facts.width_multiplier
    summary.match = facts.match
    summary.match_target = facts.match_target


def _git_commit() -> str | None:
    """The commit of the moe_lab checkout this code runs from (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _record_environment(summary: RunSummary, trainer: L.Trainer) -> None:
    """What a result depends on besides the config."""
    device = trainer.strategy.root_device
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    summary.device = name
    summary.torch_threads = torch.get_num_threads()
    summary.torch_version = torch.__version__
    summary.lightning_version = L.__version__
    summary.git_commit = _git_commit()


def _log_hyperparams(parts: RunParts, cfg: DictConfig, summary: RunSummary) -> None:
    for lg in parts.loggers:
        lg.log_hyperparams(
            {
                "params": summary.params,
                "flops_per_example": summary.flops_per_example,
                "config": OmegaConf.to_container(cfg, resolve=True),
            }
        )
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "id"):
            summary.wandb_id = lg.experiment.id


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and return its summary (also written to disk)."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = _initial_summary(cfg, run_dir)
    console.start_run(cfg, run_dir)  # noise filters, config tree to the run's log
    start = time.perf_counter()
    parts: RunParts | None = None
    try:
        validate_train_config(cfg)
        ckpt_path = check_resume(cfg, run_dir)
        quiet = {"enable_progress_bar": False, "enable_model_summary": False}
        parts = assemble_run(cfg, **(quiet if _is_multirun() else {}))
        summary.data = parts.datamodule.name
        _record_facts(summary, parts.facts)
        _record_environment(summary, parts.trainer)
        parts.module.metrics_path = run_dir / METRICS_FILE
        _log_hyperparams(parts, cfg, summary)

        parts.trainer.fit(
            parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True
        )
        if cfg.get("test", True):
            # With a held-out validation split the test set is scored once, with the checkpoint
            # that validation chose; without one (the original's protocol) validation IS the
            # test set.
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
            summary.test_acc = parts.module.test_result.get("test_acc")
        summary.status = "completed"
    except DivergedError as err:
        summary.status, summary.error_type, summary.error_message = (
            "diverged",
            type(err).__name__,
            str(err),
        )
        summary.diverged_at = {"epoch": err.epoch, "step": err.step}
        log.error("run diverged: %s", err)
    except Exception as err:  # a failing job must not sink the sweep: record it and move on
        summary.status, summary.error_type, summary.error_message = (
            "failed",
            type(err).__name__,
            str(err),
        )
        if _is_main_process():
            atomic_write_text(run_dir / "error.log", traceback.format_exc())
        log.error(
            "run failed: %s: %s (traceback in %s)", type(err).__name__, err, run_dir / "error.log"
        )
    finally:
        if parts is not None:
            _record_history(summary, parts.module.history)
        summary.wall_time_s = round(time.perf_counter() - start, 3)
        summary.segments += 1
        if _is_main_process():  # DDP's other ranks run this function too
            if parts is not None:  # the final record in each tracker's own place
                log_final_record(parts.trainer.loggers, summary)
            atomic_write_json(run_dir / SUMMARY_FILE, summary.to_dict())
            console.end_run(summary.to_dict())  # the end-of-run line
    return summary.to_dict()


def _record_history(summary: RunSummary, history: list[dict[str, float]]) -> None:
    accs = [r["val_acc"] for r in history if r.get("val_acc") == r.get("val_acc")]  # drop NaN
    summary.epochs = len(history)
    summary.val_acc_last = accs[-1] if accs else None
    summary.val_acc_best = max(accs) if accs else None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    summary = train(cfg)
    if summary["status"] != "completed" and not _is_multirun():
        print(
            f"error: run {summary['status']}: {summary['error_type']}: {summary['error_message']}\n"
            f"(summary in {summary['run_dir']}/summary.json)",
            file=sys.stderr,
        )
        sys.exit(1)
    return summary.get("val_acc_best")


def main() -> None:
    """Entry point of ``python -m moe_lab.train`` and ``moe-train``."""
    require_config_dir("train")  # one line saying what to do, not Hydra's error, without configs
    _hydra_main()


__all__ = ["ConfigError", "main", "train"]

if __name__ == "__main__":
    main()
