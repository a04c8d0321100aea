"""A progress bar that shows the running training loss and accuracy and the last validation
accuracy (Lightning's bar shows only what is logged per step, and the classifier logs per epoch).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class MetricsProgressBar(TQDMProgressBar):
    """TQDM bar with ``loss`` and ``acc`` (running means of the epoch) and ``val_acc``.

    The running values are read from the module's ``train_loss`` / ``train_acc`` metrics only
    when the bar refreshes (every ``refresh_rate`` steps), the one host read per refresh. On
    several processes they are left out: reading them would synchronise ranks from rank 0 alone.
    """

    def __init__(self, refresh_rate: int = 20, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = dict(super().get_metrics(trainer, pl_module))
        items.pop("v_num", None)
        if trainer.world_size == 1:
            for name, attr in (("loss", "train_loss"), ("acc", "train_acc")):
                metric = getattr(pl_module, attr, None)
                if metric is not None and metric.update_count > 0:
                    value = float(metric.compute())
                    items[name] = f"{100 * value:.1f}%" if name == "acc" else f"{value:.4f}"
        val_acc = trainer.callback_metrics.get("val/acc")
        if val_acc is not None:
            items["val_acc"] = f"{100 * float(val_acc):.1f}%"
        return items


__all__ = ["MetricsProgressBar"]
