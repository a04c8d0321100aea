"""Score a saved checkpoint: ``python -m moe_lab.eval ckpt_path=PATH [data=...]`` (``moe-eval``).

The network is rebuilt from the config its run recorded (``<run_dir>/.hydra/config.yaml``, found
next to the checkpoint) through the same assembly as training, the weights are loaded with
``weights_only=True``, and the test split of the run's dataset, or of ``data=...``, is scored.
The result is printed and written to ``eval.json`` (:class:`moe_lab.run.record.EvalRecord`) in the
evaluation's own output dir (``outputs/eval/<time>_<id>/``).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from moe_lab import console
from moe_lab.assembly import build_module, set_process_options
from moe_lab.config import CONFIG_DIR, ConfigError
from moe_lab.lit import Classifier
from moe_lab.run.record import EVAL_FILE, EvalRecord, hydra_config_path
from moe_lab.run.resolvers import _interactive
from moe_lab.utils.io import atomic_write_json

log = logging.getLogger("moe_lab.eval")


def find_run_config(ckpt: Path) -> Path:
    """The ``.hydra/config.yaml`` of the run that wrote ``ckpt`` (``<run>/checkpoints/x.ckpt``)."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        candidate = hydra_config_path(folder)
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"ckpt_path={ckpt}: no .hydra/config.yaml in {ckpt.parent} or {ckpt.parent.parent}; "
        "moe_lab.eval scores checkpoints inside a moe_lab run dir (<run_dir>/checkpoints/*.ckpt)"
    )


#: The code a recorded config may name for eval to build: moe_lab's own and torch's (optimizers,
#: schedulers). Anything else in a run dir's config was not written by moe_lab.train.
TRUSTED_TARGETS = ("moe_lab.", "torch.")
#: The parts of the recorded config that eval instantiates.
_BUILT_NODES = ("data", "module")


def _targets(node: Any, where: str) -> list[tuple[str, str]]:
    """``(config key, _target_)`` of every node below ``node``."""
    found = []
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            found.append((where, str(target)))
        for key, value in node.items():
            found += _targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _targets(value, f"{where}[{i}]")
    return found


def check_targets(run_cfg: DictConfig, source: Path) -> None:
    """Refuse a recorded config that would have eval build anything but moe_lab's and torch's
    own classes (a tampered ``.hydra/config.yaml`` could name any callable Hydra can import;
    ``weights_only=True`` protects the weights, this the code)."""
    for name in _BUILT_NODES:
        node = OmegaConf.to_container(run_cfg.get(name) or {}, resolve=False)
        for where, target in _targets(node, name):
            if not target.startswith(TRUSTED_TARGETS):
                raise ConfigError(
                    f"{source}: {where}._target_={target!r} is not moe_lab's or torch's code; "
                    "moe_lab.eval only builds what moe_lab.train records (was the run's config "
                    "edited?)"
                )


def run_config(ckpt: Path, cfg: DictConfig) -> DictConfig:
    """The run's recorded config, with this invocation's paths and (optionally) its ``data``.

    The network's config is resolved against the run's own dataset first, so a different
    ``data=`` changes what is scored, never the architecture that was trained.
    """
    source = find_run_config(ckpt)
    run_cfg = OmegaConf.load(source)
    check_targets(run_cfg, source)
    with open_dict(run_cfg):
        run_cfg.paths = OmegaConf.to_container(cfg.paths, resolve=True)
        run_cfg.model = OmegaConf.to_container(run_cfg.model, resolve=True)
        run_cfg.trained_data = OmegaConf.to_container(run_cfg.data, resolve=True)
        if cfg.get("data") is not None:
            run_cfg.data = OmegaConf.to_container(cfg.data, resolve=False)
    return run_cfg


def _shape_of(datamodule: Any) -> tuple[tuple[int, ...], int]:
    return tuple(datamodule.input_shape), int(datamodule.num_classes)


def check_fits(run_cfg: DictConfig, datamodule: Any, ckpt: Path) -> str:
    """Refuse data whose inputs or classes differ from the ones the run trained on."""
    trained = instantiate(run_cfg.trained_data, _convert_="all")
    (t_shape, t_classes), (shape, classes) = _shape_of(trained), _shape_of(datamodule)
    if (t_shape, t_classes) != (shape, classes):
        raise ConfigError(
            f"ckpt_path={ckpt}: the checkpoint's {run_cfg.model.get('name')} network was built "
            f"for data={trained.name} (inputs {t_shape}, {t_classes} classes), but "
            f"data={datamodule.name} has inputs {shape} and {classes} classes; evaluate it on "
            f"data with the same input shape and classes, or omit data= to use {trained.name}"
        )
    return trained.name


def load_weights(module: torch.nn.Module, ckpt: Path) -> None:
    """Load a Lightning checkpoint's weights (``weights_only=True``) with a clear error."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"ckpt_path={ckpt}: not loadable with torch.load(weights_only=True): {err}"
        ) from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"ckpt_path={ckpt}: not a Lightning checkpoint (no 'state_dict')")
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise ConfigError(
            f"ckpt_path={ckpt}: its weights do not fit the network its run's config builds "
            f"(was the run's config edited?): {err}"
        ) from err
    if isinstance(module, Classifier):  # the gates' temperature is no weight, but the model's
        module.restore_gate_temperatures(state)


class _CountExamples(L.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.n += int(batch[1].shape[0])


def evaluate(cfg: DictConfig, output_dir: Path) -> EvalRecord:
    """Score ``cfg.ckpt_path`` and write ``output_dir/eval.json``."""
    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such file")
    start = time.perf_counter()
    run_cfg = run_config(ckpt, cfg)
    set_process_options(run_cfg)
    datamodule = instantiate(run_cfg.data, _convert_="all")
    trained_on = check_fits(run_cfg, datamodule, ckpt)
    module, _ = build_module(run_cfg, datamodule)
    load_weights(module, ckpt)
    counter = _CountExamples()
    trainer = L.Trainer(
        accelerator=cfg.get("accelerator", "auto"),
        devices=1,
        logger=False,
        callbacks=[counter],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=_interactive(),
        limit_test_batches=cfg.get("limit_test_batches", 1.0),
        default_root_dir=str(output_dir),
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    device = trainer.strategy.root_device
    record = EvalRecord(
        ckpt_path=str(ckpt),
        run_dir=str(find_run_config(ckpt).parent.parent),
        model=run_cfg.model.get("name"),
        trained_on=trained_on,
        data=datamodule.name,
        seed=run_cfg.get("seed"),
        test_acc=module.test_result.get("test_acc"),
        test_loss=module.test_result.get("test_loss"),
        n_examples=counter.n,
        device=str(device),
        wall_time_s=round(time.perf_counter() - start, 3),
        output_dir=str(output_dir),
    )
    atomic_write_json(output_dir / EVAL_FILE, record.to_dict())
    return record


def result_line(record: EvalRecord) -> str:
    acc = "n/a" if record.test_acc is None else f"{100 * record.test_acc:.2f}%"
    return (
        f"test_acc {acc} (test_loss {record.test_loss:.4f}, {record.n_examples} examples) "
        f"of {record.model} on data={record.data} | {record.ckpt_path} | "
        f"{Path(str(record.output_dir)) / EVAL_FILE}"
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if (cfg.get("console") or {}).get("quiet_warnings", True):
        console.quiet_known_noise()
    try:
        record = evaluate(cfg, output_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    log.info(result_line(record))
    return record.test_acc


__all__ = ["EvalRecord", "evaluate", "main"]

if __name__ == "__main__":
    main()
