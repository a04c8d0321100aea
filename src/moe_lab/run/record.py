"""The run record, defined once: every field of a run's ``summary.json`` and every column of its
``metrics.csv``.

The training entry point writes these records and every reader (the sweep report, the
comparison report, the notebooks, the benchmark) imports them from here, so a field added below
reaches the writer, the readers and the report's contract check together.

- :class:`RunSummary`: one JSON object per run dir (``summary.json``). Accuracies are fractions
  in [0, 1]; values not known yet (or never, e.g. ``test_acc`` of a tuning trial) are ``null``.
- :class:`MetricsRow`: one CSV row per completed epoch (``metrics.csv``), followed by the
  expert-usage columns of MoE models (:func:`gate_column`).
- :class:`EvalRecord`: one checkpoint evaluation (``eval.json``, written by ``moe_lab.eval``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_lab.utils.io import atomic_write, atomic_write_json

#: Statuses a finished run writes; ``running`` is on disk only while a run is alive (or was
#: SIGKILLed, which nothing can record).
FINAL_STATUSES: tuple[str, ...] = ("completed", "failed", "diverged", "interrupted")
RUN_STATUSES: tuple[str, ...] = ("running", *FINAL_STATUSES)
#: ``stage`` of a run: a tuning trial or a final (test-scoring) run of a comparison; null for a
#: plain run or sweep job.
STAGES: tuple[str, ...] = ("tune", "final")

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
#: The traceback of a failed run.
ERROR_LOG = "error.log"
#: Each test example's predicted class and label (``pred``, ``label``: int16 arrays in the test
#: set's order), written by a run that scores the test set: the paired statistics' raw data.
PREDICTIONS_FILE = "predictions.npz"
#: Lightning's checkpoints of a run (``conf/callbacks`` puts them here): ``last.ckpt`` is where a
#: resume continues from, ``best.ckpt`` what the test scores.
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
#: Hydra's record of a run: the composed config and the command line's overrides.
HYDRA_DIR = ".hydra"
HYDRA_CONFIG = "config.yaml"
HYDRA_OVERRIDES = "overrides.yaml"


def summary_path(run_dir: Path) -> Path:
    return Path(run_dir) / SUMMARY_FILE


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run's resume point is (whether or not it exists)."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def hydra_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA_DIR / HYDRA_CONFIG


def hydra_overrides_path(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA_DIR / HYDRA_OVERRIDES


def _field(default: Any = None, *, doc: str, kind: str, required: bool = False, **kw: Any) -> Any:
    """A record field with its meaning (``doc``), JSON kind and whether readers require it."""
    metadata = {"doc": doc, "kind": kind, "required": required}
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata=metadata)
    return field(default=default, metadata=metadata)


class JsonRecord:
    """A dataclass record kept as one JSON object: :meth:`to_dict`, and :meth:`from_dict`, which
    ignores unknown keys (a newer writer's) and gives missing ones their defaults (an older
    writer's); a reader that requires fields checks them first (e.g. :func:`validate_summary`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunSummary(JsonRecord):
    """One run's ``summary.json``.

    Field kinds: ``str``, ``int``, ``float`` (an int is accepted), ``bool``, ``list`` (of str),
    ``dict``; each may be null unless it is ``status``.
    """

    # -- what was run
    experiment: str | None = _field(doc="experiment_name of the config", kind="str")
    model: str | None = _field(doc="model config name: cnn, moe, cnn_matched, ...", kind="str", required=True)  # fmt: skip
    data: str | None = _field(doc="dataset name", kind="str", required=True)
    n_experts: int | None = _field(doc="experts per MoE layer K (the matched K for cnn_matched; null for cnn)", kind="int", required=True)  # fmt: skip
    top_k: int | None = _field(doc="experts kept per sample by the router (null: all)", kind="int")
    routing: str | None = _field(doc="non-default routing options, e.g. 'gate_input=pooled'", kind="str")  # fmt: skip
    seed: int | None = _field(doc="the RNG seed", kind="int", required=True)
    stage: str | None = _field(doc="'tune' (a comparison's trial), 'final', or null", kind="str")
    arm: str | None = _field(doc="the comparison arm this run belongs to, or null", kind="str")
    trial: int | None = _field(doc="the tuning trial's number within its arm's study", kind="int")
    replicate: int | None = _field(doc="the comparison replicate (tuning study) of the run", kind="int")  # fmt: skip
    # -- model facts (moe_lab.models.ModelFacts)
    params: int | None = _field(doc="trainable parameters", kind="int", required=True)
    flops_per_example: int | None = _field(doc="forward FLOPs per example", kind="int")
    width_multiplier: float | None = _field(doc="width multiplier of the plain CNN", kind="float")
    match: str | None = _field(doc="'params' | 'flops' for matched CNNs, else null", kind="str")
    match_target: int | None = _field(doc="the matched MoE model's params or FLOPs", kind="int")
    # -- outcome
    status: str = _field("running", doc=f"one of {RUN_STATUSES}", kind="str", required=True)
    error_type: str | None = _field(doc="exception class of a failed run", kind="str")
    error_message: str | None = _field(doc="its message", kind="str")
    diverged_at: dict | None = _field(doc="{'epoch', 'step'} of a non-finite loss", kind="dict")  # noqa: RUF009
    epochs: int = _field(0, doc="completed epochs", kind="int", required=True)
    max_epochs: int | None = _field(doc="trainer.max_epochs", kind="int")
    val_acc_last: float | None = _field(doc="validation accuracy of the last epoch", kind="float", required=True)  # fmt: skip
    val_acc_best: float | None = _field(doc="best validation accuracy over epochs", kind="float", required=True)  # fmt: skip
    test_acc: float | None = _field(doc="test accuracy (null when the run does not test)", kind="float", required=True)  # fmt: skip
    wall_time_s: float | None = _field(doc="seconds, summed over resumed segments", kind="float", required=True)  # fmt: skip
    segments: int = _field(0, doc="how many times the run was started (1 + resumes)", kind="int")
    # -- provenance: what the result depends on
    run_dir: str | None = _field(doc="the run's output dir when it last ran", kind="str")
    overrides: list = _field(doc="the Hydra overrides of the job", kind="list", default_factory=list)  # noqa: RUF009  # fmt: skip
    wandb_id: str | None = _field(doc="the W&B run id, when W&B logs", kind="str")
    device: str | None = _field(doc="accelerator the run trained on, e.g. 'cpu', 'cuda:0 (H100)'", kind="str")  # fmt: skip
    torch_threads: int | None = _field(doc="torch.get_num_threads() during training", kind="int")
    torch_version: str | None = _field(doc="torch.__version__", kind="str")
    lightning_version: str | None = _field(doc="lightning.__version__", kind="str")
    git_commit: str | None = _field(doc="the moe_lab checkout's commit (+'-dirty'), if any", kind="str")  # fmt: skip


SUMMARY_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunSummary))
REQUIRED_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(RunSummary) if f.metadata["required"]
)
FIELD_KINDS: dict[str, str] = {f.name: f.metadata["kind"] for f in dataclasses.fields(RunSummary)}
FIELD_DOCS: dict[str, str] = {f.name: f.metadata["doc"] for f in dataclasses.fields(RunSummary)}
ACCURACY_FIELDS: tuple[str, ...] = ("val_acc_last", "val_acc_best", "test_acc")
NUMERIC_FIELDS: tuple[str, ...] = tuple(k for k, v in FIELD_KINDS.items() if v in ("int", "float"))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_KIND_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: _is_number(v) and float(v).is_integer(),
    "float": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


def validate_summary(summary: Any) -> list[str]:
    """Contract problems in one parsed ``summary.json`` (an empty list when it is valid)."""
    if not isinstance(summary, dict):
        return [f"summary.json holds a JSON {type(summary).__name__}, expected an object"]
    missing = [name for name in REQUIRED_FIELDS if name not in summary]
    if missing:
        return [f"summary.json missing fields {missing}"]
    problems: list[str] = []
    if summary["status"] not in RUN_STATUSES:
        problems.append(f"status {summary['status']!r} is not one of {list(RUN_STATUSES)}")
    for name, kind in FIELD_KINDS.items():
        value = summary.get(name)
        if value is None or name == "status":
            continue
        if kind in ("int", "float"):
            if not _is_number(value):
                problems.append(f"{name}={value!r} is not a number or null")
        elif not _KIND_CHECKS[kind](value):
            problems.append(f"{name}={value!r} is not a {kind} or null")
    for name in ACCURACY_FIELDS:
        value = summary.get(name)
        if _is_number(value) and not (0.0 <= value <= 1.0):
            problems.append(f"{name}={value!r} outside [0, 1] (accuracies are fractions, not %)")
        elif _is_number(value) and math.isnan(value):
            problems.append(f"{name} is NaN")
    for name in ("model", "data"):
        if not isinstance(summary[name], str) or not summary[name]:
            problems.append(f"{name}={summary[name]!r} is not a non-empty string")
    stage = summary.get("stage")
    if stage is not None and stage not in STAGES:
        problems.append(f"stage {stage!r} is not one of {list(STAGES)} or null")
    return problems


def read_summary_data(run_dir: Path) -> dict[str, Any] | None:
    """The parsed ``summary.json`` of a run dir as it stands (None when absent, unreadable or
    not a JSON object); :func:`validate_summary` says whether it keeps the contract."""
    try:
        data = json.loads(summary_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_summary(run_dir: Path) -> RunSummary | None:
    """The run's :class:`RunSummary`; None when there is none or it breaks the contract."""
    data = read_summary_data(run_dir)
    if data is None or validate_summary(data):
        return None
    return RunSummary.from_dict(data)


def write_summary(run_dir: Path, summary: RunSummary) -> Path:
    """Write ``summary.json`` atomically (a crash never leaves half a record)."""
    return write_summary_data(run_dir, summary.to_dict())


def write_summary_data(run_dir: Path, data: dict[str, Any]) -> Path:
    """Write a parsed ``summary.json`` back as it is (keys a newer writer added are kept)."""
    return atomic_write_json(summary_path(run_dir), data)


def write_predictions(run_dir: Path, pred: Any, label: Any) -> Path:
    """Write ``predictions.npz`` atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, pred=np.asarray(pred, np.int16), label=np.asarray(label, np.int16))
    data = buffer.getvalue()
    return atomic_write(Path(run_dir) / PREDICTIONS_FILE, lambda handle: handle.write(data))


def read_predictions(run_dir: Path) -> tuple[Any, Any] | None:
    """``(pred, label)`` of a run's test set, or None when it wrote none (or it is unreadable)."""
    import numpy as np

    path = Path(run_dir) / PREDICTIONS_FILE
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["pred"], archive["label"]
    except (OSError, ValueError, KeyError, EOFError):
        return None


@dataclass
class MetricsRow:
    """One epoch of ``metrics.csv``; MoE models append :func:`gate_column` columns after these."""

    epoch: int = _field(doc="0-based epoch", kind="int")
    step: int = _field(doc="optimizer steps so far", kind="int")
    train_loss: float = _field(doc="mean training cross-entropy of the epoch", kind="float")
    train_acc: float = _field(doc="training accuracy of the epoch", kind="float")
    val_loss: float = _field(doc="validation cross-entropy", kind="float")
    val_acc: float = _field(doc="validation accuracy", kind="float")
    lr: float = _field(doc="learning rate at the end of the epoch", kind="float")


METRICS_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MetricsRow))
#: with a gate temperature schedule (``experts.gate_temperature_schedule``), the MoE layers'
#: ``gate_temperature`` during the epoch, between :data:`METRICS_COLUMNS` and the gate columns
GATE_TEMPERATURE_COLUMN = "gate_temperature"
#: ``gate/<layer>/importance_<k>`` (mean gate of expert k), ``gate/<layer>/load_<k>`` (share of
#: samples routed to k), and the layer's scalars ``gate/<layer>/entropy`` (mean gate entropy),
#: ``gate/<layer>/dead`` (fraction of experts no sample used), ``gate/<layer>/dropped`` (fraction
#: of assignments a capacity limit dropped), on the validation set, and
#: ``gate/<layer>/similarity`` (the mean cosine between a unit's expert kernels).
GATE_COLUMN = re.compile(
    r"^gate/(?P<layer>.+)/(?:(?P<kind>importance|load)_(?P<expert>\d+)"
    r"|(?P<scalar>entropy|dead|dropped|similarity))$"
)
#: ``act/<layer>/std`` (the layer's output std on the validation set, after the epoch) and, in the
#: first epoch's row, ``act/<layer>/std_init`` (the same on one validation batch before training).
ACT_COLUMN = re.compile(r"^act/(?P<layer>.+)/(?P<kind>std|std_init)$")


def act_column(layer: str, kind: str = "std") -> str:
    """The metrics column of a layer's activation scale (``kind``: std or std_init)."""
    return f"act/{layer}/{kind}"


def gate_column(layer: str, stat: str, expert: int | None = None) -> str:
    """The metrics column of a gate statistic (``stat``: importance, load or entropy)."""
    return f"gate/{layer}/{stat}" if expert is None else f"gate/{layer}/{stat}_{expert}"


EVAL_FILE = "eval.json"


@dataclass
class EvalRecord(JsonRecord):
    """One checkpoint evaluation's ``eval.json`` (``python -m moe_lab.eval``)."""

    ckpt_path: str = _field(doc="the scored checkpoint", kind="str", required=True)
    run_dir: str = _field(doc="the training run the checkpoint belongs to", kind="str", required=True)  # fmt: skip
    model: str | None = _field(doc="model config name of that run", kind="str")
    trained_on: str | None = _field(doc="dataset the run trained on", kind="str")
    data: str = _field(doc="dataset whose test split was scored", kind="str", required=True)
    seed: int | None = _field(doc="the run's RNG seed", kind="int")
    test_acc: float | None = _field(doc="test accuracy, a fraction in [0, 1]", kind="float", required=True)  # fmt: skip
    test_loss: float | None = _field(doc="mean test cross-entropy", kind="float")
    n_examples: int = _field(0, doc="test examples scored", kind="int", required=True)
    device: str | None = _field(doc="device the evaluation ran on", kind="str")
    wall_time_s: float | None = _field(doc="seconds the evaluation took", kind="float")
    output_dir: str | None = _field(doc="the evaluation's own output dir", kind="str")


__all__ = [
    "ACCURACY_FIELDS",
    "ACT_COLUMN",
    "CHECKPOINT_DIR",
    "ERROR_LOG",
    "EVAL_FILE",
    "FIELD_DOCS",
    "FIELD_KINDS",
    "FINAL_STATUSES",
    "GATE_COLUMN",
    "GATE_TEMPERATURE_COLUMN",
    "HYDRA_CONFIG",
    "HYDRA_DIR",
    "HYDRA_OVERRIDES",
    "LAST_CHECKPOINT",
    "METRICS_COLUMNS",
    "METRICS_FILE",
    "NUMERIC_FIELDS",
    "PREDICTIONS_FILE",
    "REQUIRED_FIELDS",
    "RUN_STATUSES",
    "STAGES",
    "SUMMARY_FIELDS",
    "SUMMARY_FILE",
    "EvalRecord",
    "JsonRecord",
    "MetricsRow",
    "RunSummary",
    "act_column",
    "gate_column",
    "hydra_config_path",
    "hydra_overrides_path",
    "last_checkpoint",
    "read_predictions",
    "read_summary",
    "read_summary_data",
    "summary_path",
    "validate_summary",
    "write_predictions",
    "write_summary",
    "write_summary_data",
]
