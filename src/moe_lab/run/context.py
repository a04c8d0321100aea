"""Where a job runs: Hydra's context (its overrides, run or multirun, group choices), the
process's rank, and the sweep a run dir belongs to. Outside a Hydra app (a notebook, a test) each
answer is the one for a single run."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only

from moe_lab.run.sweep import MULTIRUN_FILE


def hydra_overrides() -> list[str]:
    """The job's command-line overrides (empty outside Hydra)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (e.g. called from a notebook)
        return []


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def is_main_process() -> bool:
    """Rank 0: the process that writes the run's record (DDP's other ranks do not)."""
    return rank_zero_only.rank == 0


def group_choice(group: str) -> str | None:
    """The option Hydra chose for a config group (e.g. ``data``), or None."""
    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        return None


def hydra_output_subdir() -> str | None:
    try:
        subdir = HydraConfig.get().output_subdir
    except ValueError:
        return None
    return str(subdir) if subdir else None


def sweep_dir_of(run_dir: Path) -> Path | None:
    """The sweep a job belongs to: the multirun's dir, or (for a job that ``moe_lab.finish``
    reruns or resumes on its own) the run dir's parent when it holds the sweep's
    ``multirun.yaml``; None for a single run."""
    if is_multirun():
        return Path(HydraConfig.get().sweep.dir)
    parent = run_dir.parent
    return parent if (parent / MULTIRUN_FILE).is_file() else None


__all__ = [
    "group_choice",
    "hydra_output_subdir",
    "hydra_overrides",
    "is_main_process",
    "is_multirun",
    "sweep_dir_of",
]
