"""Every public preset of the ``data``, ``experiment`` and ``activation`` groups composes to what it
composed to before the presets were rewritten on shared bases (``tests/expected/presets.json``,
written from the configs as they were, each yaml a full copy).

An experiment preset is recorded as the group choices it makes and the keys it sets on top of
them (the difference to ``train`` composed with the same choices and no experiment), so edits to
other groups (optimizer, trainer, ...) don't churn the expectation. After an intended change to a
preset, rewrite the file with ``python tests/test_presets.py`` and review the diff.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_lab.config import CONFIG_DIR

EXPECTED = Path(__file__).resolve().parent / "expected" / "presets.json"
GROUPS = ("data", "experiment", "activation")
# Hydra bookkeeping that differs between any two compositions
_VOLATILE = ("hydra.runtime", "hydra.overrides", "hydra.job")
# new name -> the deprecated alias it replaced (the alias must compose exactly as before)
RENAMED = {
    "experiment/original_cifar10": "experiment/seed_cifar10",
    "activation/layer_defaults": "activation/seed_defaults",
}


def public_presets(group: str) -> list[str]:
    """The options users select; files starting with ``_`` are shared bases."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.name.startswith("_"))


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _compose(overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def describe(group: str, name: str) -> dict[str, Any]:
    """What selecting ``group=name`` sets, unresolved (interpolations stay as written)."""
    cfg = _compose([f"{group}={name}"])
    if group != "experiment":
        return cfg[group]
    defaults = _compose([])["hydra"]["runtime"]["choices"]
    choices = {
        g: c
        for g, c in cfg["hydra"]["runtime"]["choices"].items()
        if g != "experiment" and c != defaults.get(g)
    }
    base = _flat(_compose([f"{g}={c}" for g, c in choices.items()]))
    flat = {k: v for k, v in _flat(cfg).items() if not k.startswith(_VOLATILE)}
    return {
        "choices": dict(sorted(choices.items())),
        "sets": {k: v for k, v in sorted(flat.items()) if base.get(k, "<unset>") != v},
        "removes": sorted(k for k in base if k not in flat and not k.startswith(_VOLATILE)),
    }


def describe_all() -> dict[str, Any]:
    return {f"{g}/{n}": describe(g, n) for g in GROUPS for n in public_presets(g)}


def _expected() -> dict[str, Any]:
    return json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {}


@pytest.mark.parametrize("key", sorted(_expected()))
def test_preset_composes_as_before(key: str) -> None:
    group, name = key.split("/")
    assert describe(group, name) == _expected()[key]


@pytest.mark.parametrize(("new", "old"), sorted(RENAMED.items()))
def test_renamed_preset_equals_its_old_self(new: str, old: str) -> None:
    group, name = new.split("/")
    got, want = describe(group, name), _expected()[old]
    if group == "experiment":  # the new name names its runs after itself
        assert got["sets"].pop("experiment_name") == name
        want = {**want, "sets": {k: v for k, v in want["sets"].items() if k != "experiment_name"}}
    assert got == want


def test_every_public_preset_is_covered() -> None:
    """A new preset gets an expectation too (and a renamed one keeps its old name)."""
    now = {f"{g}/{n}" for g in GROUPS for n in public_presets(g)}
    assert set(_expected()) <= now
    assert now - set(_expected()) <= set(RENAMED)


if __name__ == "__main__":
    EXPECTED.parent.mkdir(exist_ok=True)
    EXPECTED.write_text(json.dumps(describe_all(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {EXPECTED}", file=sys.stderr)
