"""The one labelling function: what a group of runs is called, in the reports and in W&B alike.

A label is the model, its experts (``K=``, ``top-k``, non-default routing) and the overrides
that tell the group from the others of its sweep, e.g. ``"moe K=4 top-1 gate_input=pooled"`` or
``"moe K=2 optimizer.lr=0.003"``. A job's W&B run name is its group's label and its seed
(``"moe K=2 optimizer.lr=0.003 seed=1"``), so a W&B run and the report row it feeds carry the
same words.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from moe_lab.run.sweep import parse_overrides

#: Overrides a label never lists as swept values: the label's own fields (the model; the data,
#: which each report gives its own section) and the seed, which is what a group repeats over.
FIELD_KEYS: frozenset[str] = frozenset({"model", "data", "seed"})


def is_present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    try:
        import pandas as pd

        return not bool(pd.isna(value))
    except (ImportError, TypeError, ValueError):
        return True


def whole_number_text(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return str(int(value))
    return str(value)


def group_label(
    model: Any,
    n_experts: Any = None,
    top_k: Any = None,
    routing: Any = None,
    swept: Iterable[tuple[str, str]] = (),
) -> str:
    """Readable name of a group of repetitions, e.g. ``"moe K=2"``, ``"moe K=8 top-2"``, ``"cnn"``,
    ``"moe K=4 top-1 gate_input=pooled"``, ``"moe K=2 optimizer.lr=0.003"`` (``swept``: the
    ``(key, value)`` overrides that tell this group from others of the same model and K)."""
    parts = [str(model) if is_present(model) else "?"]
    if is_present(n_experts):
        parts.append(f"K={whole_number_text(n_experts)}")
    if is_present(top_k):
        parts.append(f"top-{whole_number_text(top_k)}")
    if is_present(routing) and str(routing):
        parts.append(str(routing))
    parts += [f"{key}={value}" for key, value in swept]
    return " ".join(parts)


def labelled_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``{key: normalized value}`` of the overrides a label may list: those that identify a job
    (:func:`moe_lab.run.sweep.parse_overrides`) other than :data:`FIELD_KEYS`."""
    return {k: v for k, v in parse_overrides(overrides).items() if k not in FIELD_KEYS}


def job_label(fields: Mapping[str, Any], overrides: Iterable[str], varying: set[str] | None) -> str:
    """A job's name: its :func:`group_label` with the overrides that vary across its sweep
    (``varying``; None for a single run: every override that identifies it), then its seed.

    ``fields``: the run record's ``model``, ``n_experts``, ``top_k``, ``routing`` and ``seed``.
    """
    swept = [
        (key, value)
        for key, value in labelled_overrides(overrides).items()
        if varying is None or key in varying
    ]
    label = group_label(
        fields.get("model"), fields.get("n_experts"), fields.get("top_k"), fields.get("routing"),
        swept,
    )  # fmt: skip
    return f"{label} seed={fields.get('seed')}"


__all__ = ["FIELD_KEYS", "group_label", "job_label", "labelled_overrides"]
