"""``python -m moe_lab.compare experiment=NAME [compare.trials=N] [compare.seeds=S] [overrides]``
(installed as ``moe-compare``): the equal-budget comparison.

For each arm (by default the preset's models, e.g. cnn, moe, cnn_matched) an Optuna study of
``compare.trials`` trials searches ``conf/hparams_search/`` on the held-out validation split, with
the same budget for every arm; then each arm's best configuration is re-run with ``compare.seeds``
fresh seeds and scores the test set once. Everything lands in
``outputs/compare/<experiment>/<time>_<id>/``; ``resume=<that dir>`` continues a killed
comparison. See :mod:`moe_lab.compare.runner` for the protocol and
:mod:`moe_lab.analysis.compare_report` for the report.

This module is the Hydra app; each trial and final run is one job of it, run by the configured
launcher (``hydra/launcher=basic|joblib|submitit_local|submitit_slurm``).
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from moe_lab.config import CONFIG_DIR

__all__ = ["main"]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="compare")
def main(cfg: DictConfig) -> dict[str, Any]:
    """One job of a comparison: a trial (stage "tune") or a final run (stage "final")."""
    if cfg.get("stage") not in ("tune", "final"):
        print(
            "moe_lab.compare: error: this app runs comparisons in multirun mode; do not set "
            "hydra.mode=RUN (to train one model, use python -m moe_lab.train)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from hydra.core.hydra_config import HydraConfig

    from moe_lab.compare.store import hold_job_lock
    from moe_lab.train import train  # torch and Lightning load in the jobs only

    with hold_job_lock(HydraConfig.get().sweep.dir):
        return train(cfg)
