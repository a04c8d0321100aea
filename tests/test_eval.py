"""python -m moe_lab.eval: score a tiny run's checkpoint, refuse data it does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_module
from moe_lab.run.record import EVAL_FILE, EvalRecord

TRAIN = [
    "experiment=mnist1d",
    "model=moe",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "trainer.accelerator=cpu",
    "logger=none",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("eval")
    proc = run_module(
        "moe_lab.train", *TRAIN, f"paths.root_dir={root}", f"paths.data_dir={data_dir}", cwd=root
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (root / "outputs" / "runs" / "mnist1d").iterdir()
    return run_dir


def _eval(run_dir: Path, data_dir: Path, *overrides: str):
    root = run_dir.parents[3]
    return run_module(
        "moe_lab.eval",
        f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
        f"paths.root_dir={root}",
        f"paths.data_dir={data_dir}",
        "accelerator=cpu",
        *overrides,
        cwd=root,
    )


def test_eval_scores_the_checkpoint_as_the_run_tested_it(trained_run: Path, data_dir: Path) -> None:
    proc = _eval(trained_run, data_dir, "limit_test_batches=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (eval_dir,) = (trained_run.parents[3] / "outputs" / "eval").iterdir()
    record = EvalRecord.from_dict(json.loads((eval_dir / EVAL_FILE).read_text()))
    summary = json.loads((trained_run / "summary.json").read_text())
    # the run tested best.ckpt on the same two test batches after training (held-out protocol)
    assert record.test_acc == pytest.approx(summary["test_acc"], abs=1e-7)
    assert record.model == "moe" and record.data == record.trained_on == "mnist1d"
    assert record.n_examples == 2 * 256  # two evaluation batches of max(256, batch_size)
    assert record.run_dir == str(trained_run) and record.output_dir == str(eval_dir)
    assert f"test_acc {100 * record.test_acc:.2f}%" in proc.stdout
    assert str(eval_dir / EVAL_FILE) in proc.stdout
    assert (eval_dir / "eval.log").read_text().strip()


def _eval_cfg(ckpt: Path, data_dir: Path, out: Path, *overrides: str):
    from moe_lab.config import compose_config

    return compose_config(
        [f"ckpt_path={ckpt}", f"paths.data_dir={data_dir}", "accelerator=cpu", *overrides],
        config_name="eval",
        output_dir=out,
    )


def test_eval_refuses_data_the_model_does_not_fit(
    trained_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    from moe_lab.config import ConfigError
    from moe_lab.eval import evaluate

    ckpt = trained_run / "checkpoints" / "best.ckpt"
    cfg = _eval_cfg(ckpt, data_dir, tmp_path, "data=digits")
    with pytest.raises(ConfigError) as err:
        evaluate(cfg, tmp_path)
    assert "data=mnist1d (inputs (1, 40), 10 classes)" in str(err.value)
    assert "data=digits has inputs (1, 8, 8)" in str(err.value)
    assert not (tmp_path / EVAL_FILE).exists()


def test_eval_refuses_a_checkpoint_outside_a_run_dir(tmp_path: Path, data_dir: Path) -> None:
    ckpt = tmp_path / "loose" / "model.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    proc = run_module(
        "moe_lab.eval", f"ckpt_path={ckpt}", f"paths.root_dir={tmp_path}", cwd=tmp_path
    )
    # the command line's answer: one line on stderr, exit code 2, no traceback
    assert proc.returncode == 2 and "no .hydra/config.yaml" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_recorded_config_naming_foreign_code_is_refused(
    trained_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    """A tampered ``.hydra/config.yaml`` beside a checkpoint could name any callable Hydra can
    import (here ``builtins.open`` in write mode, which would truncate a file); eval builds only
    moe_lab's and torch's code, and says so in one line."""
    import shutil

    import yaml

    run_dir = trained_run.parent / "tampered"
    shutil.copytree(trained_run, run_dir)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    config_path = run_dir / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["data"]["augment"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    config_path.write_text(yaml.safe_dump(config))
    proc = _eval(run_dir, data_dir)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert "data.augment._target_='builtins.open' is not moe_lab's or torch's code" in errors[0]
    assert victim.read_text() == "precious\n"
