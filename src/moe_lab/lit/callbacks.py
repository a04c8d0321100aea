"""Training callbacks, plugins and loggers: divergence detection, atomic checkpoint writes,
checkpoints that survive a moved run dir, a CSV logger that a resumed run continues."""

from __future__ import annotations

import csv
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from moe_lab.run.task import RunStopped
from moe_lab.utils.io import atomic_write, signals_deferred


class DivergedError(RunStopped, RuntimeError):
    """The training loss became NaN or infinite: the run ends ``diverged``, at that epoch/step."""

    status = "diverged"

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(
            f"training loss is {value} at epoch {epoch}, step {step}: the run diverged; "
            "try a lower learning rate, gradient clipping (trainer.gradient_clip_val=1.0) or "
            "float32 precision"
        )
        self.epoch, self.step, self.value = epoch, step, value

    def record(self, summary: Any) -> None:
        summary.diverged_at = {"epoch": self.epoch, "step": self.step}


class DivergenceMonitor(L.Callback):
    """Stops the run with :class:`DivergedError` when the training loss is not finite.

    On CPU the check is immediate. On CUDA it never blocks the host: each step's flag is copied
    to pinned memory asynchronously and read one step later, once its event has completed, so a
    divergence stops the run at most one step late (the reported step is the diverging one).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[torch.cuda.Event, torch.Tensor, torch.Tensor, int, int]] = []

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach()
        epoch, step = trainer.current_epoch, trainer.global_step
        if loss.device.type != "cuda":
            if not torch.isfinite(loss):
                raise DivergedError(epoch, step, float(loss))
            return
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host, loss, epoch, step))
        self._check(block=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(block=True)

    def _check(self, block: bool) -> None:
        while self._pending:
            event, host, _, epoch, step = self._pending[0]
            if not block and not event.query():
                return
            event.synchronize()
            self._pending.pop(0)
            if not torch.isfinite(host):
                self._pending.clear()
                raise DivergedError(epoch, step, float(host))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so a kill never
    leaves a truncated ``last.ckpt``; loads with ``weights_only=True`` unless told otherwise."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_write(os.fspath(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is None:
            weights_only = True
        return super().load_checkpoint(
            path,
            map_location=map_location or (lambda storage, loc: storage),
            weights_only=weights_only,
        )


class EpochSeeder(L.Callback):
    """Reseeds torch, numpy and random at the start of every training epoch from
    ``(seed, epoch, rank)``.

    The random stream of an epoch (dropout masks, noisy gates) then depends on where the run is,
    not on how it got there: a run resumed from a checkpoint draws exactly what the uninterrupted
    run drew. (The data order has its own per-epoch seed, see the data modules.)
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_seed = (
            self.seed * 1_000_003 + trainer.current_epoch * 7_919 + trainer.global_rank
        ) % 2**32
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, except that a run dir that was moved or copied resumes with
    its best checkpoint and best score.

    Lightning forgets ``best_model_score`` (and the top-k bookkeeping) when the checkpoint's
    ``dirpath`` differs from the current one, so the first resumed epoch would overwrite
    ``best.ckpt`` whatever its score. Here the recorded paths are moved to the new dir first:
    the files kept their names, only the folder changed.
    """

    # A SIGTERM/SIGINT waits until the epoch's checkpoints (best and last) are both written: a
    # signal between the two would leave an epoch recorded but not resumable.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with signals_deferred():
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with signals_deferred():
            super().on_train_epoch_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old is not None and self.dirpath is not None and old != self.dirpath:
            state_dict = relocate_checkpoint_state(state_dict, old, self.dirpath)
        super().load_state_dict(state_dict)


def relocate_checkpoint_state(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """ModelCheckpoint's state with every path under ``old`` moved under ``new``."""

    def move(path: Any) -> Any:
        if not isinstance(path, str) or not path:
            return path
        rel = os.path.relpath(path, old)
        return path if rel.startswith("..") else os.path.join(new, rel)

    moved = dict(state)
    moved["dirpath"] = new
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in moved:
            moved[key] = move(moved[key])
    if isinstance(moved.get("best_k_models"), dict):
        moved["best_k_models"] = {move(k): v for k, v in moved["best_k_models"].items()}
    return moved


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; this one keeps
    its rows and header and appends after them."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)  # Lightning writes its header sorted


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger, except that a resumed run continues ``csv/metrics.csv`` instead of
    starting it afresh (and losing the epochs from before the interruption)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
