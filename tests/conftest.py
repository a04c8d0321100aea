"""Shared fixtures: run the CLIs as a user would, in a scratch dir, with offline W&B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (scripts/test.sh runs one worker per core) a worker's in-process torch
    # must not spread over every core too: oversubscribed torch threads are ~100x slower.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # one thread per process: test jobs run side by side on few cores, and oversubscribed torch
    # threads are ~100x slower
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        MPLBACKEND="Agg",
        CI="1",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def run_module(
    module: str, *args: str, cwd: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m module args...`` in ``cwd``; returns the finished process (never raises)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir for the session, so generated datasets are built once."""
    return tmp_path_factory.mktemp("data")


def compose_train(overrides: list[str], run_dir: Path, data_dir: Path):
    """The training config as ``python -m moe_lab.train`` would compose it, for in-process runs,
    with outputs and data in tmp dirs (through the package's one compose helper)."""
    from moe_lab.config import compose_config

    return compose_config(
        [f"paths.data_dir={data_dir}", f"paths.root_dir={run_dir.parent}", *overrides],
        output_dir=run_dir,
    )
