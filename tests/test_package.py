"""moe_lab as an installed package: the wheel carries conf/, and a non-editable install trains,
reports and runs the Jacobian experiment from any directory; the config dir lookup and its errors.

The wheel test builds from a copy of the checkout, installs with ``pip install --target`` into a
fresh dir and runs the installed commands from an unrelated dir with only that dir on
``PYTHONPATH`` (the venv still provides torch and the other dependencies).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, cli_env
from moe_lab import config
from moe_lab.config import CONFIG_DIR_ENV, config_dir_problem
from moe_lab.experiments.jacobian import read_record

# Top-level entries of the checkout that a build never needs (outputs, caches, other tools').
_NOT_COPIED = {
    ".git", ".venv", "build", "dist", "outputs", "multirun", "data", "logs", "wandb",
    "bench_out", ".pytest_cache", ".ruff_cache", "notebooks", "docs",
}  # fmt: skip


def _conf_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}


# ---------------------------------------------------------------------------------------------
# The lookup (fast)
# ---------------------------------------------------------------------------------------------


def test_checkout_finds_its_top_level_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    # in a checkout, moe_lab/conf is a symlink to the top-level conf/; the lookup resolves it
    monkeypatch.delenv(CONFIG_DIR_ENV, raising=False)
    assert config._find_config_dir() == (REPO_ROOT / "conf").resolve()
    package_conf = Path(config.__file__).parent / "conf"
    assert package_conf.is_symlink() and package_conf.resolve() == (REPO_ROOT / "conf").resolve()
    assert config_dir_problem("train") is None and config_dir_problem("jacobian") is None


def test_env_var_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    assert config._find_config_dir() == tmp_path  # even without train.yaml: no silent fallback


def test_config_dir_problems_say_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere"
    problem = config_dir_problem("train", missing)
    assert problem == (
        f"config dir {missing} does not exist; reinstall moe_lab (its wheel carries conf/), "
        f"or set {CONFIG_DIR_ENV} to a copy of the repository's conf/ dir"
    )
    (tmp_path / "empty").mkdir()
    assert "has no train.yaml" in config_dir_problem("train", tmp_path / "empty")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "train.yaml").write_text("seed: 0\n")
    assert config_dir_problem("train", tmp_path / "ok") is None

    def unreadable(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # chmod cannot lock out root, who runs these tests in CI containers; refuse the read instead
    monkeypatch.setattr(Path, "open", unreadable)
    problem = config_dir_problem("train", tmp_path / "ok")
    assert problem.startswith(f"config dir {tmp_path / 'ok'} is not readable (Permission denied)")


def test_compose_config_reports_the_same_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(config.ConfigError, match=r"has no train\.yaml; reinstall moe_lab"):
        config.compose_config([])


def test_bad_env_config_dir_is_one_line_before_hydra(tmp_path: Path) -> None:
    env = cli_env(**{CONFIG_DIR_ENV: str(tmp_path / "nowhere")})
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lab.train", "trainer.max_epochs=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {CONFIG_DIR_ENV}={tmp_path / 'nowhere'} does not exist; point {CONFIG_DIR_ENV} "
        "at a copy of moe_lab's conf/ dir, or unset it to use the configs installed with moe_lab"
    ]
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------
# The wheel, installed away from the checkout (slow: builds, installs, trains)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the wheel from a copy of the checkout and install it with ``pip --target``."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    shutil.copytree(
        REPO_ROOT,
        source,
        symlinks=True,  # src/moe_lab/conf stays a link, as in a clone
        ignore=lambda d, names: _NOT_COPIED if Path(d) == REPO_ROOT else {"__pycache__"},
    )
    for egg_info in (source / "src").glob("*.egg-info"):
        shutil.rmtree(egg_info)
    wheels, target = root / "wheels", root / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("moe_lab-*.whl")
    install = [*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    elsewhere = root / "elsewhere"  # an unrelated working dir
    elsewhere.mkdir()
    return {"wheel": wheel, "site": target, "cwd": elsewhere}


def _run(installed: dict[str, Path], *cmd: str, **env: str) -> subprocess.CompletedProcess[str]:
    site = installed["site"]
    full_env = cli_env(PYTHONPATH=str(site), PATH=f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}")
    full_env.pop(CONFIG_DIR_ENV, None)
    full_env.update(env)
    return subprocess.run(
        list(cmd), cwd=installed["cwd"], env=full_env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_wheel_carries_every_config(installed: dict[str, Path]) -> None:
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = {n.removeprefix("moe_lab/conf/") for n in wheel.namelist() if "/conf/" in n}
    assert names == _conf_files(REPO_ROOT / "conf")
    assert not (installed["site"] / "moe_lab" / "conf").is_symlink()  # a real copy


@pytest.mark.slow
def test_installed_package_imports_from_its_install_dir(installed: dict[str, Path]) -> None:
    proc = _run(
        installed,
        sys.executable,
        "-c",
        "import moe_lab, moe_lab.config as c; print(moe_lab.__file__); print(c.CONFIG_DIR)",
    )
    assert proc.returncode == 0, proc.stderr
    module_file, config_dir = proc.stdout.split()
    site = installed["site"].resolve()
    assert Path(module_file).resolve().is_relative_to(site)  # not the checkout's src/
    assert Path(config_dir) == site / "moe_lab" / "conf"


@pytest.mark.slow
def test_installed_commands_train_report_and_run_the_jacobian(installed: dict[str, Path]) -> None:
    cwd = installed["cwd"]
    train = _run(
        installed,
        "moe-train",
        "data=digits",
        "model=cnn",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "logger=csv",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    (summary,) = (cwd / "outputs" / "runs" / "adhoc").glob("*/summary.json")
    assert '"status": "completed"' in summary.read_text()

    report = _run(installed, "moe-report", str(summary.parent.parent))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "cnn" in (summary.parent.parent / "report.md").read_text()

    jac = _run(
        installed,
        "moe-jacobian",
        "n_inputs=3",
        "width=4",
        "n_experts=[1,2]",
        f"hydra.run.dir={cwd / 'jacobian_run'}",
    )
    assert jac.returncode == 0, jac.stderr[-3000:]
    record = read_record(cwd / "jacobian_run")
    assert sorted(record.models) == ["dense_relu", "moe_K1", "moe_K2"]
    assert record.settings.width == 4


def _readme_block(marker: str) -> str:
    """The README's bash block that contains ``marker``."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


@pytest.mark.slow
def test_readme_own_configs_example_works_as_written(installed: dict[str, Path]) -> None:
    block = _readme_block("my_conf/experiment/")
    proc = _run(installed, "bash", "-euo", "pipefail", "-c", block)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((installed["cwd"] / "outputs" / "runs" / "digits_quick").glob("*/summary.json"))
    assert len(runs) == 2  # --config-dir and hydra.searchpath both find the user's preset
    for summary in runs:
        text = summary.read_text()
        assert '"experiment": "digits_quick"' in text and '"status": "completed"' in text
