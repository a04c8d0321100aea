"""Train one model: ``python -m moe_lab.train [overrides]`` (``moe-train``); ``-m`` for sweeps.

Every run ends with ``summary.json`` in its output dir, whatever happened: status ``completed``,
``failed`` (with the error) or ``diverged`` (with the epoch and step). A failing job never stops the
other jobs of a sweep; the sweep's report lists it and the multirun exits non-zero at the end.
"""

from __future__ import annotations

import logging
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
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from moe_lab.config import (
    CONFIG_DIR,
    ConfigError,
    check_resume,
    require_config_dir,
    validate_train_config,
)
from moe_lab.lit import AtomicCheckpointIO, Classifier, DivergedError
from moe_lab.models import count_flops
from moe_lab.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("moe_lab.train")


SUMMARY_FIELDS = (
    "experiment", "model", "data", "n_experts", "top_k", "routing", "seed", "params", "flops_per_example",
    "width_multiplier", "match", "match_target", "status", "error_type", "error_message", "diverged_at",
    "epochs", "max_epochs", "val_acc_last", "val_acc_best", "test_acc", "wall_time_s", "run_dir",
    "overrides",
)  # fmt: skip


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


# The layers' routing defaults: options that differ from them name a variant in the report.
_ROUTING_DEFAULTS = {"noisy_gating": False, "gate_input": "full", "expert_backend": "auto"}


def _routing_variant(moe_kwargs: Any) -> str | None:
    """E.g. ``"gate_input=pooled,noisy_gating=True"``; None for the seed's routing (``top_k`` has a
    field of its own)."""
    changed = [
        f"{key}={moe_kwargs[key]}"
        for key, default in _ROUTING_DEFAULTS.items()
        if key in moe_kwargs and moe_kwargs[key] != default
    ]
    return ",".join(changed) or None


def _initial_summary(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = dict.fromkeys(SUMMARY_FIELDS)
    model_cfg = cfg.get("model") or {}
    experts_cfg = cfg.get("experts") or {}
    summary.update(
        experiment=cfg.get("experiment_name"),
        model=model_cfg.get("name"),
        data=_group_choice("data"),
        n_experts=experts_cfg.get("n_experts")
        if model_cfg.get("kind") != "cnn" or model_cfg.get("match")
        else None,
        top_k=(experts_cfg.get("moe_kwargs") or {}).get("top_k"),
        routing=_routing_variant(experts_cfg.get("moe_kwargs") or {}),
        seed=cfg.get("seed"),
        max_epochs=(cfg.get("trainer") or {}).get("max_epochs"),
        status="running",
        epochs=0,
        run_dir=str(run_dir),
        overrides=_hydra_overrides(),
    )
    return summary


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and return its summary (also written to disk)."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = _initial_summary(cfg, run_dir)
    start = time.perf_counter()
    lit: Classifier | None = None
    try:
        validate_train_config(cfg)
        ckpt_path = check_resume(cfg, run_dir)
        L.seed_everything(cfg.seed, workers=True)
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        if cfg.get("matmul_precision"):
            torch.set_float32_matmul_precision(cfg.matmul_precision)

        # plain containers (not DictConfig) in hyperparameters keep checkpoints weights_only-loadable
        datamodule = instantiate(cfg.data, _convert_="all")
        summary["data"] = datamodule.name
        net = instantiate(cfg.model, _convert_="all")(
            input_shape=datamodule.input_shape, num_classes=datamodule.num_classes
        )
        summary["params"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
        summary["flops_per_example"] = count_flops(net, datamodule.input_shape)
        info = getattr(net, "model_info", {})
        summary["n_experts"] = info.get("n_experts", summary["n_experts"])
        summary["width_multiplier"] = info.get("width_multiplier", 1.0)
        summary["match_target"] = info.get("match_target")
        summary["match"] = (getattr(net, "match_info", None) or {}).get("match")
        memory_format = {3: torch.channels_last, 4: torch.channels_last_3d}.get(
            len(datamodule.input_shape)
        )
        if cfg.get("channels_last") and memory_format is not None:  # 1D data has no such layout
            net = net.to(memory_format=memory_format)
        if cfg.get("compile"):
            net.compile()

        lit = Classifier(
            net,
            num_classes=datamodule.num_classes,
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
            scheduler_interval=cfg.get("scheduler_interval", "step"),
            aux_loss_weights=cfg.experts.get("aux_loss_weights"),
            channels_last=bool(cfg.get("channels_last")),
        )
        lit.metrics_path = run_dir / "metrics.csv"

        loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        trainer_kwargs: dict[str, Any] = {}
        if _is_multirun():
            trainer_kwargs.update(enable_progress_bar=False, enable_model_summary=False)
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            logger=loggers or False,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=str(run_dir),
            **trainer_kwargs,
        )
        for lg in loggers:
            lg.log_hyperparams(
                {
                    "params": summary["params"],
                    "flops_per_example": summary["flops_per_example"],
                    "config": OmegaConf.to_container(cfg, resolve=True),
                }
            )
            if hasattr(lg, "experiment") and hasattr(lg.experiment, "id"):
                summary["wandb_id"] = lg.experiment.id

        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        # With a held-out validation split the test set is scored once, with the checkpoint that
        # validation chose; without one (the seed's protocol) validation IS the test set.
        held_out = float(cfg.data.get("val_split", 0.0) or 0.0) > 0
        trainer.test(
            lit,
            datamodule=datamodule,
            ckpt_path="best" if held_out else None,
            weights_only=True,
            verbose=False,
        )
        summary["test_acc"] = lit.test_result.get("test_acc")
        summary["status"] = "completed"
    except DivergedError as err:
        summary.update(status="diverged", error_type=type(err).__name__, error_message=str(err))
        summary["diverged_at"] = {"epoch": err.epoch, "step": err.step}
        log.error("run diverged: %s", err)
    except Exception as err:  # a failing job must not sink the sweep: record it and move on
        summary.update(status="failed", error_type=type(err).__name__, error_message=str(err))
        if _is_main_process():
            atomic_write_text(run_dir / "error.log", traceback.format_exc())
        log.error(
            "run failed: %s: %s (traceback in %s)", type(err).__name__, err, run_dir / "error.log"
        )
    finally:
        if lit is not None:
            _record_history(summary, lit)
        summary["wall_time_s"] = round(time.perf_counter() - start, 3)
        if _is_main_process():  # DDP's other ranks run this function too
            atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _record_history(summary: dict[str, Any], lit: Classifier) -> None:
    accs = [r["val_acc"] for r in lit.history if r.get("val_acc") == r.get("val_acc")]  # drop NaN
    summary["epochs"] = len(lit.history)
    summary["val_acc_last"] = accs[-1] if accs else None
    summary["val_acc_best"] = max(accs) if accs else None


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
