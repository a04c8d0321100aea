"""One way to turn a composed config into the parts of a run.

``train.py``, the benchmark, the notebooks, the tests and the comparison driver all build their
runs here, from the same composed config (``moe_lab.config.compose_config`` outside a Hydra app),
so a change in ``conf/`` reaches every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from moe_lab.lit import AtomicCheckpointIO, Classifier, GateTemperatureSchedule
from moe_lab.lit.progress import MetricsProgressBar
from moe_lab.models import ModelFacts

# 4D/5D inputs have a channels-last layout; 1D data (3D tensors) has none.
_CHANNELS_LAST = {3: torch.channels_last, 4: torch.channels_last_3d}


@dataclass
class RunParts:
    """The instantiated parts of one run."""

    datamodule: L.LightningDataModule
    module: Classifier
    trainer: L.Trainer
    facts: ModelFacts
    loggers: list[Any] = field(default_factory=list)


def set_process_options(cfg: DictConfig) -> None:
    """Process-wide settings a run asks for: the RNG seed, torch threads, matmul precision."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)


def build_module(cfg: DictConfig, datamodule: Any) -> tuple[Classifier, ModelFacts]:
    """The Lightning module of ``cfg.module`` with its network built for ``datamodule``'s inputs."""
    # plain containers (not DictConfig) in hyperparameters keep checkpoints weights_only-loadable
    net, facts = instantiate(cfg.module.net, _convert_="all")(
        input_shape=datamodule.input_shape, num_classes=datamodule.num_classes
    )
    memory_format = _CHANNELS_LAST.get(len(datamodule.input_shape))
    if cfg.get("channels_last") and memory_format is not None:
        net = net.to(memory_format=memory_format)
    if cfg.get("compile"):
        net.compile()
    module = instantiate(cfg.module, net=net, num_classes=datamodule.num_classes, _convert_="all")
    return module, facts


def build_network(cfg: DictConfig) -> ModelFacts:
    """Build the network a run of ``cfg`` would train, without its data or a trainer (the data
    module reads no file before ``setup``; it only gives the input shape): the pre-flight check
    that a config's model can be built at all. Raises what the build raises."""
    datamodule = instantiate(cfg.data, _convert_="all", load_test=False)
    net, facts = instantiate(cfg.module.net, _convert_="all")(
        input_shape=datamodule.input_shape, num_classes=datamodule.num_classes
    )
    del net
    return facts


def experts_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks the experts config asks for, whatever the callbacks group holds: with
    ``experts.gate_temperature_schedule`` set, the :class:`GateTemperatureSchedule` (which
    leaves a model without MoE layers alone); none otherwise."""
    schedule = OmegaConf.select(cfg, "experts.gate_temperature_schedule", default=None)
    if schedule is None:
        return []
    return [GateTemperatureSchedule(**OmegaConf.to_container(schedule, resolve=True))]


def assemble_run(cfg: DictConfig, **trainer_overrides: Any) -> RunParts:
    """Instantiate data, module, loggers, callbacks and trainer from a composed config.

    ``trainer_overrides`` are keyword arguments for ``lightning.Trainer`` that a caller decides
    at run time (e.g. no progress bar inside a sweep); everything else comes from ``cfg``.
    """
    set_process_options(cfg)
    # test=false (a comparison's tuning trial): the data module never loads the test split
    datamodule = instantiate(cfg.data, _convert_="all", load_test=bool(cfg.get("test", True)))
    module, facts = build_module(cfg, datamodule)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += experts_callbacks(cfg)
    # where the trainer shows a progress bar, one with the running loss and accuracy
    show_bar = trainer_overrides.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar"))
    if show_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(MetricsProgressBar())
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(cfg.paths.output_dir),
        **trainer_overrides,
    )
    return RunParts(datamodule, module, trainer, facts, loggers)
