"""The Hydra Sweeper of ``python -m moe_lab.compare`` (``hydra/sweeper=compare``).

Hydra only loads sweepers from the ``hydra_plugins`` package, so this thin class lives here and
hands the work to :mod:`moe_lab.compare.runner` (imported when the sweep starts: Hydra imports
every plugin module at start-up, and this one must stay cheap).
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class CompareSweeper(Sweeper):
    """Runs an equal-budget comparison (see :class:`moe_lab.compare.runner.Comparison`).

    Args:
        params: an experiment preset's grid (``hydra.sweeper.params``, for ``moe_lab.train -m``);
            the comparison takes its arms and seeds from the ``compare:`` block instead, and only
            reads ``params.model`` as the default list of arms.
    """

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from moe_lab.compare.runner import Comparison

        assert self.config is not None and self.hydra_context is not None
        assert self.launcher is not None
        return Comparison(
            config=self.config,
            hydra_context=self.hydra_context,
            launcher=self.launcher,
            arguments=list(arguments),
            grid_params=self.params,
        ).run()
