"""An offline W&B run read back as one object (name, group, tags, config, history, summary,
exit code), from the records ``wandb_log.settled_records`` decodes with wandb's own protobufs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb_log import settled_records


def read_records(path: Path) -> list[Any]:
    """Every record of one ``.wandb`` file (the CRC-checked reader of ``wandb_log``), once W&B's
    service has written its run record."""
    return settled_records(Path(path))


@dataclass
class WandbRun:
    """What one offline run file holds."""

    run_id: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def _items(items: Any) -> dict[str, Any]:
    out = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def read_run(run_dir: Path) -> WandbRun:
    """``run_dir``: an ``offline-run-*`` folder."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    run = WandbRun()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group, run.tags = (
                r.run_id,
                r.display_name,
                r.run_group,
                list(r.tags),
            )
            run.config.update(_items(r.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
