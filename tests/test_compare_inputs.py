"""The comparison's bad inputs are refused before any training, and its small parts work alone:
the search-space syntax, the override formatting, the test-free data module, the lock."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from moe_lab.compare.space import format_override, parse_space
from moe_lab.config import ConfigError
from moe_lab.data import DigitsDataModule

BASE = [
    "experiment=digits",
    "compare.arms=[cnn,moe]",
    "compare.trials=2",
    "compare.seeds=2",
    "trainer.max_epochs=1",
    "logger=csv",
    "hydra/launcher=basic",
]


def _run_compare(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> pytest.ExceptionInfo:
    """``python -m moe_lab.compare args...`` in this process; returns the SystemExit it raised."""
    from moe_lab.compare import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        ["moe_lab.compare", *args, f"paths.log_dir={tmp_path / 'out'}", "hydra.output_subdir=null"],
    )
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        GlobalHydra.instance().clear()
    return exit_info


BAD_INPUTS = [
    (["compare.arms=[cnn,nope]"], "unknown arm 'nope'"),
    (["compare.arms=[]"], "at least one arm"),
    (["compare.arms=[cnn,cnn]"], "more than once"),
    (["compare.trials=0"], "compare.trials=0 is invalid"),
    (["compare.seeds=1"], "compare.seeds=1 is invalid: expected an integer >= 2"),
    (["compare.baseline=nope"], "compare.baseline='nope' is not one of the arms"),
    (["compare.final_seed_base=1"], "no final seed is a tuning seed"),
    (["data.val_split=0"], "data.val_split=0 is refused"),
    (["~hparams_search"], "the search space is empty"),
    (["hparams_search.optimizer.lr=null"], "search-space entry optimizer.lr is empty"),
    (["hparams_search.optimizer.lr=0.1"], "is not a search range"),
    (
        ["hparams_search.optimizer.lrr=interval(0.1,0.2)"],
        "unknown search-space key(s) ['optimizer.lrr']",
    ),
    (["optimizer.lr=tag(log,interval(0,1))"], "a log-scale interval needs low > 0"),
    (["hparams_search.optimizer=interval(0.1,0.2)"], "is a config section"),
    (["model=cnn"], "the arms choose the model"),
    (["seed=3"], "the comparison sets the seeds"),
    (["test=true"], "the comparison sets test=false"),
    (["resume=/no/such/dir"], "no such directory"),
    # composes and validates, but no network can be built from it: refused before training
    (["data.topology.blocks.0.pool=64"], "arm 'cnn': its model cannot be built"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_is_refused_before_any_training(
    extra: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    exit_info = _run_compare([*BASE, *extra], tmp_path, monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("moe_lab.compare: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback
    assert not (tmp_path / "out").exists()  # no comparison dir, nothing trained


def test_resume_of_a_dir_that_is_not_a_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_dir = tmp_path / "outputs" / "runs" / "adhoc" / "some_run"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{}")
    exit_info = _run_compare([*BASE, f"resume={run_dir}"], tmp_path, monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a comparison dir (it has no comparison.json)" in err
    assert "moe_lab.train resume=RUN_DIR" in err


def test_resume_of_a_dir_in_use_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Another process holds the comparison's lock: a second one must not run beside it."""
    import fcntl

    from moe_lab.compare.runner import MARKER, STUDY_DB

    comparison = tmp_path / "cmp"
    comparison.mkdir()
    # a record whose settings match the command, so that only the lock stops the resume
    settings_probe = _settings_for(BASE, tmp_path, monkeypatch)
    capsys.readouterr()
    (comparison / MARKER).write_text(
        json.dumps({"kind": "moe_lab.compare", "settings": settings_probe})
    )
    (comparison / STUDY_DB).write_bytes(b"")
    with open(comparison / ".compare.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        exit_info = _run_compare([*BASE, f"resume={comparison}"], tmp_path, monkeypatch)
    assert exit_info.value.code == 2
    assert "is in use by another running comparison" in capsys.readouterr().err


def _settings_for(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The settings a comparison with ``args`` records (its checks run; nothing trains)."""
    from moe_lab.compare import runner

    captured: dict = {}

    def stop(self, resume):
        captured.update(json.loads(json.dumps(self.settings)))
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(runner.Comparison, "_open_dir", stop)
    _run_compare(args, tmp_path, monkeypatch)
    monkeypatch.undo()
    return captured


# ---------------------------------------------------------------------------- search space
def test_space_syntax_becomes_optuna_distributions() -> None:
    distributions, texts = parse_space(
        {
            "optimizer.lr": "tag(log, interval(1e-4, 3e-2))",
            "data.topology.dense_dropout": "interval(0.0, 0.7)",
            "data.batch_size": "choice(32, 64, 128)",
            "experts.n_experts": "range(1, 9, 2)",
            "trainer.max_epochs": "int(interval(5, 10))",
            "data.eval_batch_size": "tag(log, int(interval(64, 1024)))",
        }
    )
    assert distributions["optimizer.lr"] == optuna.distributions.FloatDistribution(
        1e-4, 3e-2, log=True
    )
    assert distributions["data.topology.dense_dropout"] == optuna.distributions.FloatDistribution(
        0.0, 0.7
    )
    assert distributions["data.batch_size"] == optuna.distributions.CategoricalDistribution(
        [32, 64, 128]
    )
    assert distributions["experts.n_experts"] == optuna.distributions.IntDistribution(1, 7, step=2)
    assert distributions["trainer.max_epochs"] == optuna.distributions.IntDistribution(5, 10)
    assert distributions["data.eval_batch_size"] == optuna.distributions.IntDistribution(
        64, 1024, log=True
    )
    assert texts["optimizer.lr"] == "tag(log, interval(1e-4, 3e-2))"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("interval(0.5, 0.1)", "low < high"),
        ("choice(1)", "at least two values"),
        ("range(3, 3)", "empty"),
        ("range(0.5, 2.5)", "takes ints"),
        ("tag(log, choice(1, 2))", "interval() and range() only"),
        ("interval(", "cannot be parsed"),
        ("", "is empty"),
    ],
)
def test_bad_ranges(expression: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space({"optimizer.lr": expression})


@pytest.mark.parametrize(
    "value",
    [1e-05, 0.0012345678901234567, 3.0, 7, True, None, "adam", "with space", "3", "null", "a=b"],
)
def test_format_override_round_trips_through_hydra(value) -> None:
    (override,) = OverridesParser.create().parse_overrides([format_override("x.y", value)])
    assert override.value() == value
    assert type(override.value()) is type(value)


# ---------------------------------------------------------------------------- data
def test_a_data_module_without_its_test_split(tmp_path: Path) -> None:
    dm = DigitsDataModule(tmp_path, val_split=0.2, load_test=False)
    dm.setup()
    assert "test" not in dm._splits
    x_val, _ = dm.split("val")
    x_train, _ = dm.split("train")
    assert x_val.shape[0] + x_train.shape[0] == 1437  # validation is carved out of training
    with pytest.raises(RuntimeError, match="without its test split"):
        dm.split("test")
    with pytest.raises(RuntimeError, match="without its test split"):
        dm.test_dataloader()
    # the same train/val split as a run that does load the test set
    full = DigitsDataModule(tmp_path, val_split=0.2)
    full.setup()
    assert torch.equal(full.split("val")[0], x_val)
    with pytest.raises(ValueError, match="needs a held-out validation split"):
        DigitsDataModule(tmp_path, val_split=0.0, load_test=False)


def test_arms_beyond_a_model_and_the_recorded_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings_for(
        [
            *BASE,
            '+compare.arm_overrides.moe_k4=["model=moe","experts=k4"]',
            "compare.arms=[cnn,moe_k4]",
            "hparams_search.optimizer.lr=tag(log, interval(1e-3, 1e-2))",
        ],
        tmp_path,
        monkeypatch,
    )
    assert settings["arms"] == {"cnn": ["model=cnn"], "moe_k4": ["model=moe", "experts=k4"]}
    assert settings["space"]["optimizer.lr"] == "tag(log, interval(1e-3, 1e-2))"
    assert settings["tune_seeds"] == [0, 1] and settings["final_seeds"] == [1000, 1001]
    assert not set(settings["tune_seeds"]) & set(settings["final_seeds"])
    every_key = ["optimizer.lr", "optimizer.weight_decay", "data.topology.dense_dropout"]
    assert settings["arm_keys"] == {"cnn": every_key, "moe_k4": every_key}


def test_a_moved_aside_attempt_says_how_it_ended(tmp_path: Path) -> None:
    """A run a kill cut off before its first checkpoint starts over in its dir; the attempt moved
    aside keeps its files, and its record says ``interrupted``, not ``running``."""
    from moe_lab.compare.store import ComparisonStore

    comparison = tmp_path / "cmp"
    run_dir = comparison / "tune" / "cnn" / "trial_000"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "running", "epochs": 0, "x": 1}))
    (run_dir / "train.log").write_text("kept\n")
    ComparisonStore(comparison, lock=None).set_aside(run_dir)  # type: ignore[arg-type]
    assert not run_dir.exists()
    (moved,) = (comparison / "tune" / "cnn" / ".killed").iterdir()
    summary = json.loads((moved / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["x"] == 1
    assert "started over in" in summary["error_message"]
    assert (moved / "train.log").read_text() == "kept\n"


def test_finish_on_a_file_says_it_is_a_file(tmp_path: Path, capsys) -> None:
    from moe_lab.finish import main as finish_main

    path = tmp_path / "notes.txt"
    path.write_text("x")
    assert finish_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a sweep dir" in err and "does not exist" not in err
