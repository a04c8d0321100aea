"""The Lightning module that trains any classifier network, MoE or not."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from moe_lab.layers import AUX_LOSS_NAMES, MoEBase
from moe_lab.layers.diagnostics import expert_similarity
from moe_lab.run.record import gate_column
from moe_lab.utils.io import atomic_write_text

from .diagnostics import ActivationScales, scales_at_init

#: the checkpoint's entry holding each MoE layer's gate temperature (by qualified name)
_TEMPERATURES = "moe_lab_gate_temperature"

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]


class Classifier(L.LightningModule):
    """Cross-entropy classifier around the network ``net`` (logits out).

    - The loss adds every MoE layer's ``regularization_loss()`` (the original's Keras regularizers) and
      the routing's auxiliary losses weighted by ``aux_loss_weights`` (name -> weight).
    - ``apply_constraints()`` runs on every MoE layer after each optimizer step.
    - Metrics accumulate on the device and are read once per epoch: nothing in the training step
      waits for the host.
    - Each epoch's numbers (train/val loss and accuracy, learning rate, and per MoE layer the mean
      gate and load of each expert and the gate entropy on the validation set) go to the loggers,
      to ``history`` (kept in checkpoints, so a resumed run continues the same table) and, if
      ``metrics_path`` is set, to that CSV. A callback adds a column by setting a value in
      ``epoch_values`` during the epoch (the gate temperature schedule's ``gate_temperature``).
    - Checkpoints keep every MoE layer's ``gate_temperature`` (a plain attribute, not in the
      state dict), so a checkpoint loaded to test scores at the temperature it trained with.

    Args:
        net: the network; ``(B, *input_shape) -> (B, num_classes)`` (kept as ``self.model``,
            the checkpoints' key prefix).
        num_classes: number of classes.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` or None.
        scheduler_interval: ``"step"`` (Keras' per-update decay) or ``"epoch"``.
        aux_loss_weights: weight of each routing auxiliary loss, by the names the layers'
            ``aux_losses()`` return.
        channels_last: feed 4D/5D inputs in channels_last memory format.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        aux_loss_weights: Mapping[str, float] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
            )
        self.model = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        unknown = sorted(set(aux_loss_weights or {}) - set(AUX_LOSS_NAMES))
        if unknown:
            raise ValueError(
                f"aux_loss_weights: unknown auxiliary losses {unknown}; the MoE layers compute "
                f"{', '.join(AUX_LOSS_NAMES)}"
            )
        self.aux_loss_weights = {k: float(v) for k, v in (aux_loss_weights or {}).items() if v}
        self.channels_last = channels_last
        # A plain dict: the layers are already registered as submodules of ``model``.
        self.moe_layers: dict[str, MoEBase] = {
            name: m for name, m in net.named_modules() if isinstance(m, MoEBase)
        }
        self._penalized = [m for m in self.moe_layers.values() if m.has_penalties]

        def accuracy() -> MulticlassAccuracy:
            # validate_args=False: the argument checks read values back to the host every step
            return MulticlassAccuracy(num_classes, average="micro", validate_args=False)

        self.train_acc, self.val_acc, self.test_acc = accuracy(), accuracy(), accuracy()
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")
        self._gate_sums: dict[str, dict[str, Tensor]] = {}
        self._gate_count = 0
        self.history: list[dict[str, float]] = []
        #: values a callback records for the current epoch (name -> value): they join its row
        self.epoch_values: dict[str, float] = {}
        #: each layer's output scale on the validation set (moe_lab.lit.diagnostics)
        self._scales = ActivationScales(net)
        self._scales_at_init: dict[str, float] = {}
        self.test_result: dict[str, float] = {}
        #: the last test's ``(predicted class, label)`` per test example, in the test set's order
        self.test_predictions: tuple[np.ndarray, np.ndarray] | None = None
        self._test_batches: list[tuple[Tensor, Tensor]] = []
        self.metrics_path: Path | None = None

    # -- forward and losses ------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        return self.model(x)

    def _extra_loss(self) -> Tensor | float:
        extra: Tensor | float = 0.0
        for layer in self._penalized:
            extra = extra + layer.regularization_loss()
        if self.aux_loss_weights:
            for layer in self.moe_layers.values():
                losses = layer.aux_losses()
                for name, weight in self.aux_loss_weights.items():
                    extra = extra + weight * losses[name]
        return extra

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        ce = F.cross_entropy(logits, y)
        loss = ce + self._extra_loss()
        self.train_loss.update(ce.detach(), weight=y.shape[0])
        self.train_acc.update(logits.detach(), y)
        return loss

    def _eval_step(
        self, batch: tuple[Tensor, Tensor], loss_metric: MeanMetric, acc: MulticlassAccuracy
    ) -> Tensor:
        x, y = batch
        logits = self(x)
        loss_metric.update(F.cross_entropy(logits, y), weight=y.shape[0])
        acc.update(logits, y)
        return logits

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self._scales.recording():
            self._eval_step(batch, self.val_loss, self.val_acc)
        self._scales.count_batch()
        self._accumulate_gate_stats(batch[0].shape[0])

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        logits = self._eval_step(batch, self.test_loss, self.test_acc)
        # each example's prediction, for the paired statistics of a comparison (an int each)
        self._test_batches.append((logits.argmax(dim=1).to(torch.int16), batch[1].to(torch.int16)))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        for layer in self.moe_layers.values():
            layer.apply_constraints()

    # -- expert usage ----------------------------------------------------------------------------

    def _accumulate_gate_stats(self, batch_size: int) -> None:
        for name, layer in self.moe_layers.items():
            sums = self._gate_sums.setdefault(name, {})
            for key, value in layer.routing_stats().items():
                weighted = value * batch_size
                sums[key] = weighted if key not in sums else sums[key] + weighted
        self._gate_count += batch_size

    def _gate_epoch_stats(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        if not self._gate_sums:
            return stats
        count = torch.tensor(float(self._gate_count), device=self.device)
        count = self.trainer.strategy.reduce(count, reduce_op="sum")
        for name, sums in self._gate_sums.items():
            for key, total in sums.items():
                mean = self.trainer.strategy.reduce(total, reduce_op="sum") / count
                values = mean.flatten().tolist()  # the one host read, once per epoch
                if mean.dim() == 0:
                    stats[f"gate/{name}/{key}"] = values[0]
                else:
                    stats.update({f"gate/{name}/{key}_{k}": v for k, v in enumerate(values)})
        self._gate_sums, self._gate_count = {}, 0
        return stats

    # -- epoch bookkeeping -----------------------------------------------------------------------

    def on_train_start(self) -> None:
        # a fresh run (not a resume): every layer's output scale before the first step
        if self.global_step == 0 and self.trainer.datamodule is not None:
            batch = next(iter(self.trainer.datamodule.val_dataloader()))
            batch = (batch[0].to(self.device), batch[1])
            self._scales_at_init = scales_at_init(self.model, batch, self._scales)

    def on_train_epoch_start(self) -> None:
        self.train_loss.reset()
        self.train_acc.reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.val_loss.reset()
            self.val_acc.reset()
            self._gate_sums, self._gate_count = {}, 0
            self._scales.collect()
            return
        # The epoch's row is built here, not at train-epoch end: validation closes the epoch, and
        # the checkpoint saved right after must already hold the row.
        row: dict[str, float] = {"epoch": self.current_epoch, "step": self.global_step}
        row["train_loss"] = _compute(self.train_loss)
        row["train_acc"] = _compute(self.train_acc)
        row["val_loss"] = _compute(self.val_loss)
        row["val_acc"] = _compute(self.val_acc)
        row["lr"] = (
            self.trainer.optimizers[0].param_groups[0]["lr"]
            if self.trainer.optimizers
            else float("nan")
        )
        row.update(self.epoch_values)
        row.update(self._gate_epoch_stats())
        for name, layer in self.moe_layers.items():
            row[gate_column(name, "similarity")] = expert_similarity(layer)
        row.update(self._scales.collect())
        if self._scales_at_init:  # in the first epoch's row only
            row.update(self._scales_at_init)
            self._scales_at_init = {}
        self.val_loss.reset()
        self.val_acc.reset()
        logged = {
            "train/loss": row["train_loss"],
            "train/acc": row["train_acc"],
            "val/loss": row["val_loss"],
            "val/acc": row["val_acc"],
            "lr": row["lr"],
            **self.epoch_values,
        }
        logged.update({k: v for k, v in row.items() if k.startswith(("gate/", "act/"))})
        self.log_dict(logged)  # values are already reduced across processes
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
        self._write_metrics()

    def on_test_epoch_end(self) -> None:
        self.test_result = {
            "test_loss": _compute(self.test_loss),
            "test_acc": _compute(self.test_acc),
        }
        self.test_loss.reset()
        self.test_acc.reset()
        if self._test_batches:
            pred, label = (
                torch.cat(parts).cpu().numpy() for parts in zip(*self._test_batches, strict=True)
            )
            self.test_predictions = (pred, label)
        self._test_batches = []
        self.log_dict(
            {"test/loss": self.test_result["test_loss"], "test/acc": self.test_result["test_acc"]}
        )

    def _write_metrics(self) -> None:
        if self.metrics_path is None or self.global_rank != 0:
            return
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.metrics_path, buffer.getvalue())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moe_lab_history"] = [dict(r) for r in self.history]
        checkpoint[_TEMPERATURES] = {n: m.gate_temperature for n, m in self.moe_layers.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only a resumed fit continues the table; testing the best checkpoint must not roll the
        # run's history back to that epoch.
        if self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING:
            self.history = [dict(r) for r in checkpoint.get("moe_lab_history", [])]
        self.restore_gate_temperatures(checkpoint)

    def restore_gate_temperatures(self, checkpoint: Mapping[str, Any]) -> None:
        """Set each MoE layer's ``gate_temperature`` to the checkpoint's (none recorded: unchanged)."""
        for name, tau in checkpoint.get(_TEMPERATURES, {}).items():
            if name in self.moe_layers:
                self.moe_layers[name].gate_temperature = tau

    # -- optimisation ----------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }


def _compute(metric: MeanMetric | MulticlassAccuracy) -> float:
    if metric.update_count == 0:
        return float("nan")
    return float(metric.compute())
