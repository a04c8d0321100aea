# TEMPORARY stand-in until the helper's module lands
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_facts(device: torch.device) -> dict[str, Any]:
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return {
        "device": name,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "lightning_version": L.__version__,
        "git_commit": git_commit(),
    }
