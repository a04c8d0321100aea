"""What a run says on the terminal and in its log (``<run_dir>/train.log``).

- At the start, the resolved config as a tree (rich's, if installed, else YAML) goes to the run's
  log (logger ``moe_lab.config``: the log file only, see ``conf/hydra/job_logging/moe_lab.yaml``);
  ``console.print_config=true`` also prints it on the terminal.
- At the end, one line: status, best validation accuracy, test accuracy and the run dir.
- ``console.quiet_warnings`` (default true) filters warnings every run prints that say nothing
  about this run (:data:`NOISE`); warnings that remain go to the run's log as well.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("moe_lab.train")
config_log = logging.getLogger("moe_lab.config")

#: Messages filtered by ``console.quiet_warnings=true``, with why each one is noise here.
NOISE: dict[str, str] = {
    # Lightning advertises its cloud logger on every Trainer
    r"💡 Tip: For seamless cloud logging": "Lightning's litlogger advertisement",
    # Lightning's own pytree helper trips a torch deprecation; nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": "torch deprecation inside Lightning",
    # the datasets are in-memory tensors (or on the GPU): worker processes would only add copies
    r"The '\w+' does not have many workers": "in-memory datasets need no loader workers",
    # logger=mlflow: every run has a fresh store in its run dir, so these hold on every run
    r"Experiment with name .* not found\. Creating it": "a new MLflow store per run",
    r"Creating initial MLflow database tables|Updating database tables": "a new MLflow store per run",
}


class _NoiseFilter(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self._pattern = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.search(record.getMessage())


_FILTER = _NoiseFilter(list(NOISE))
# where the logged noise comes from (Lightning's tip, MLflow's store set-up)
_NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.loggers.mlflow",
    "mlflow.store.db.utils",
)


def quiet_known_noise() -> None:
    """Filter :data:`NOISE` from warnings and from the loggers that print it (idempotent)."""
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=f"(?s).*{pattern}")
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _container(cfg: DictConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. a ${hydra:...} outside a Hydra app: show it unresolved
        return OmegaConf.to_container(cfg, resolve=False)


def config_tree(cfg: DictConfig, width: int = 100) -> str:
    """The resolved config as text: a rich tree if rich is installed, else YAML."""
    data = _container(cfg)
    try:
        from rich.console import Console
        from rich.syntax import Syntax
        from rich.tree import Tree
    except ImportError:
        return OmegaConf.to_yaml(OmegaConf.create(data)).rstrip()
    tree = Tree("config")
    for key, value in data.items():
        branch = tree.add(str(key))
        text = (
            OmegaConf.to_yaml(OmegaConf.create(value)) if isinstance(value, Mapping) else str(value)
        )
        branch.add(Syntax(text.rstrip(), "yaml"))
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(tree)
    return buffer.getvalue().rstrip()


def _log_file_of(run_dir: Path) -> bool:
    """Whether Hydra's job logging writes a log file in ``run_dir`` (a CLI run, not a notebook)."""
    for handler in logging.getLogger().handlers:
        filename = getattr(handler, "baseFilename", None)
        if filename and Path(filename).resolve().parent == run_dir.resolve():
            return True
    return False


def start_run(cfg: DictConfig, run_dir: Path) -> None:
    """Console set-up at the start of a run: noise filters, the config tree in the log."""
    options = cfg.get("console") or {}
    if options.get("quiet_warnings", True):
        quiet_known_noise()
    if _log_file_of(run_dir):
        # warnings also land in the run's log, next to what caused them
        logging.captureWarnings(True)
    tree = config_tree(cfg)
    config_log.info("resolved config of %s:\n%s", run_dir, tree)
    if options.get("print_config", False):
        print(tree, flush=True)


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "n/a"


def end_of_run_line(summary: Mapping[str, Any]) -> str:
    """E.g. ``run completed | best val_acc 71.25% | test_acc 69.80% | 3 epochs, 12.3 s | <dir>``."""
    status = summary.get("status")
    head = f"run {status}"
    if status != "completed" and summary.get("error_type"):
        head += f" ({summary['error_type']})"
    epochs = summary.get("epochs") or 0
    wall = summary.get("wall_time_s")
    timing = f"{epochs} epoch{'s' if epochs != 1 else ''}" + (
        f", {wall:.1f} s" if isinstance(wall, int | float) else ""
    )
    return " | ".join(
        [
            head,
            f"best val_acc {_pct(summary.get('val_acc_best'))}",
            f"test_acc {_pct(summary.get('test_acc'))}",
            timing,
            str(summary.get("run_dir")),
        ]
    )


def end_run(summary: Mapping[str, Any]) -> str:
    """Log the end-of-run line (terminal and run log) and return it."""
    line = end_of_run_line(summary)
    (log.info if summary.get("status") == "completed" else log.error)(line)
    return line


__all__ = ["NOISE", "config_tree", "end_of_run_line", "end_run", "quiet_known_noise", "start_run"]
