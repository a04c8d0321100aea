"""TEMPORARY stand-in for moe_lab.config.compose_config and moe_lab.assembly.assemble_run
(landing on main); deleted once they do."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from moe_lab.config import CONFIG_DIR
from moe_lab.lit import AtomicCheckpointIO, Classifier


def compose_config(
    overrides: list[str], config_name: str = "train", output_dir: str | None = None
) -> DictConfig:
    from hydra import compose, initialize_config_dir

    extra = []
    if output_dir is not None:
        extra = [f"paths.output_dir={output_dir}", f"paths.root_dir={output_dir}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=[*extra, *overrides])


@dataclass
class RunParts:
    datamodule: Any
    module: Classifier
    trainer: L.Trainer
    facts: dict[str, Any] = field(default_factory=dict)
    loggers: list[Any] = field(default_factory=list)


def assemble_run(cfg: DictConfig) -> RunParts:
    datamodule = instantiate(cfg.data, _convert_="all")
    net = instantiate(cfg.model, _convert_="all")(
        input_shape=datamodule.input_shape, num_classes=datamodule.num_classes
    )
    lit = Classifier(
        net,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        scheduler_interval=cfg.get("scheduler_interval", "step"),
        aux_loss_weights=cfg.experts.get("aux_loss_weights"),
        channels_last=bool(cfg.get("channels_last")),
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    with warnings.catch_warnings():
        trainer = instantiate(
            cfg.trainer,
            logger=loggers or False,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=str(cfg.paths.output_dir),
        )
    return RunParts(datamodule, lit, trainer, {}, loggers)
