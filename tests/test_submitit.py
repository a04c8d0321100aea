"""The cluster path without a cluster: a 2-job sweep through hydra/launcher=submitit_local, the
submitit code path that submitit_slurm uses (job pickles, per-job processes, result collection)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import run_module


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local(tmp_path: Path, data_dir: Path) -> None:
    proc = run_module(
        "moe_lab.train",
        "-m",
        "hydra/launcher=submitit_local",
        "model=cnn,moe",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2",
        "trainer.accelerator=cpu",
        "logger=none",
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={data_dir}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep,) = (tmp_path / "outputs" / "multirun" / "adhoc").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file())
    summaries = [json.loads((p / "summary.json").read_text()) for p in jobs]
    assert sorted(s["model"] for s in summaries) == ["cnn", "moe"]
    assert all(s["status"] == "completed" for s in summaries), summaries
    # submitit ran each job as its own job: a folder per job id with its pickled result and logs
    # (plus the unexpanded "%j" template folder submitit creates before it knows any id)
    job_folders = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(job_folders) == 2, list((sweep / ".submitit").iterdir())
    for folder in job_folders:
        assert list(folder.glob("*_result.pkl"))
        (out,) = folder.glob("*_log.out")
        assert "run completed | best val_acc" in out.read_text()  # the job's own stdout
    # the multirun-end callback saw both jobs
    with open(sweep / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
