"""``moe_lab.run.environment``: the facts a result depends on besides its config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch

from moe_lab.run import environment
from moe_lab.run.environment import (
    RunEnvironment,
    device_name,
    git_commit,
    machine_environment,
    run_environment,
)

CPU = torch.device("cpu")


def test_run_environment_holds_what_a_run_summary_records() -> None:
    env = run_environment(CPU)
    assert isinstance(env, RunEnvironment)
    assert env.to_dict() == {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "lightning_version": lightning.__version__,
        "git_commit": git_commit(),
    }


def test_device_name_adds_the_gpu_model_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    assert device_name(torch.device("cuda", 1)) == "cuda:1 (Fake GPU)"
    assert device_name(CPU) == "cpu"


def test_git_commit_is_the_checkout_head_or_none() -> None:
    head = subprocess.run(
        ["git", "-C", str(Path(environment.__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    )
    commit = git_commit()
    if head.returncode != 0:  # an installed copy, outside any checkout
        assert commit is None
    else:
        assert commit is not None and commit.removesuffix("-dirty") == head.stdout.strip()


def test_machine_environment_has_the_bench_keys() -> None:
    env = machine_environment(CPU)
    assert list(env) == [
        "device",
        "cpu_model",
        "cpu_count",
        "torch_threads",
        "gpu",
        "torch",
        "cuda",
        "lightning",
        "python",
    ]
    assert env["device"] == "cpu" and env["gpu"] is None and env["cpu_model"]
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
