"""OmegaConf resolvers used by the configs in ``conf/``. Registered on import (idempotent)."""

from __future__ import annotations

import os
import secrets
import sys
import time

from omegaconf import OmegaConf

from moe_lab.run.record import HYDRA_DIR


def _unique_id() -> str:
    # Cached per config (use_cache=True), and Hydra copies resolver caches into each job's config,
    # so every job of one sweep agrees on the sweep dir while two processes started in the same
    # second never do.
    return f"{os.getpid():x}{secrets.token_hex(2)}"


def _wandb_offline() -> bool:
    """W&B stays offline unless the user opts in with WANDB_MODE=online."""
    return os.environ.get("WANDB_MODE", "offline").lower() != "online"


def _interactive() -> bool:
    """A progress bar only where a person watches: a TTY, and not in CI."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def _resume_subdir(resume: str | None) -> str:
    """Hydra's record dir: ``.hydra``, or a fresh one beside it when resuming, so that the
    original run's record is never overwritten."""
    if resume is None:
        return HYDRA_DIR
    return f"{HYDRA_DIR}_resume_{time.strftime('%Y-%m-%d_%H-%M-%S')}_{_unique_id()}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("uid", _unique_id, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("wandb_offline", _wandb_offline, replace=True)
    OmegaConf.register_new_resolver("interactive", _interactive, replace=True)
    OmegaConf.register_new_resolver("cwd", os.getcwd, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("resume_subdir", _resume_subdir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver(
        "if_none", lambda value, default: default if value is None else value, replace=True
    )


register_resolvers()
