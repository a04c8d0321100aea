"""The house's import rules: each folder of ``src/moe_lab`` imports only the folders below it
(CONTRIBUTING.md's table), read statically from every ``import`` in every module, those inside
functions included, so a lazy import cannot hide an arrow that points up."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moe_lab"

#: folder (or top-level module) -> the moe_lab folders it may import. Entry points (the top-level
#: CLI modules, ``bench``, ``compare``) are the roof: they may import everything below them.
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "layers": set(),
    "run": {"utils"},
    "models": {"layers"},
    "data": {"utils"},
    "lit": {"layers", "models", "run", "utils"},
    "analysis": {"run", "utils"},
    "config": {"run", "utils"},
    "console": {"run", "utils"},
    "assembly": {"lit", "models", "run", "utils", "layers"},
    "experiments": {"analysis", "layers", "run", "utils", "config"},
}
ROOF = {"train", "eval", "finish", "report", "results", "jacobian", "bench", "compare", "__init__"}
#: What ``moe_lab.layers`` may import outside moe_lab (SPEC §2: torch only).
LAYERS_THIRD_PARTY = {"torch"}


def _home(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def _imports(path: Path, package: list[str]) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every import in the file (``package``: its package's dotted
    parts, to resolve relative imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            if node.module:
                found.append((node.lineno, ".".join([*base, *node.module.split(".")])))
            else:  # ``from .. import models``: each name is a module
                found += [(node.lineno, ".".join([*base, alias.name])) for alias in node.names]
    return found


def _torch_or_stdlib(top: str) -> bool:
    return top in LAYERS_THIRD_PARTY or top in sys.stdlib_module_names or top == "__future__"


def violations(path: Path, home: str, package: list[str]) -> list[str]:
    """The imports of ``path`` (a module of folder ``home``) that break :data:`ALLOWED`."""
    wrong = []
    for line, module in _imports(path, package):
        parts = module.split(".")
        if parts[0] == "moe_lab" and len(parts) > 1:
            target = parts[1]
            if target != home and target not in ALLOWED[home]:
                wrong.append(f"line {line}: {module}")
        elif home == "layers" and not _torch_or_stdlib(parts[0]):
            wrong.append(f"line {line}: {module} (layers import torch only)")
    return wrong


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts)


def test_every_folder_is_in_the_table() -> None:
    homes = {_home(p) for p in _modules()}
    assert homes <= set(ALLOWED) | ROOF, homes - set(ALLOWED) - ROOF


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downward(path: Path) -> None:
    home = _home(path)
    if home in ROOF:
        return
    package = ["moe_lab", *path.relative_to(PACKAGE).parts[:-1]]
    wrong = violations(path, home, package)
    assert not wrong, f"{path.relative_to(PACKAGE)} ({home}) imports upward: {wrong}"


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import numpy\n"
        "from ..run.record import RunSummary\n"
        "def f():\n"
        "    from moe_lab.layers import DenseMoE\n"
        "    from .. import models\n"
    )
    wrong = violations(probe, "analysis", ["moe_lab", "analysis"])
    assert wrong == ["line 4: moe_lab.layers", "line 5: moe_lab.models"]
    assert violations(probe, "layers", ["moe_lab", "layers"])[0] == (
        "line 1: numpy (layers import torch only)"
    )
