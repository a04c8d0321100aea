"""Test helpers imported by the jobs of the comparison tests (via PYTHONPATH): a digits data
module that logs every touch of its test split, and a callback that slows epochs down so a test
can kill a comparison at a known point."""

from __future__ import annotations

import json
import os
import time

from lightning.pytorch import Callback

from moe_lab.data import DigitsDataModule


def _log(event: str, **fields: object) -> None:
    path = os.environ.get("MOE_LAB_SPY_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")


class SpyDigits(DigitsDataModule):
    """Digits, logging (to $MOE_LAB_SPY_LOG) each load and each use of the test split."""

    def setup(self, stage: str | None = None) -> None:
        first = self._splits is None
        super().setup(stage)
        if first:
            _log("setup", seed=self.seed, load_test=self.load_test, has_test="test" in self._splits)

    def split(self, which: str):
        if which == "test":
            _log("split_test", seed=self.seed)
        return super().split(which)

    def test_dataloader(self):
        _log("test_dataloader", seed=self.seed)
        return super().test_dataloader()


class SlowEpochs(Callback):
    """Sleeps ``seconds`` after every training epoch."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        time.sleep(self.seconds)
