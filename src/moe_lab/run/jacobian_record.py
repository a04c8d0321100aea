"""A Jacobian-experiment run dir (``python -m moe_lab.jacobian``): its files' names, and its record
``jacobian.json`` as a typed :class:`JacobianRecord` with its reader and writer.

The run dir holds

- :data:`SPECTRA_FILE` ``spectra.csv`` (columns :data:`SPECTRA_COLUMNS`): ``model, n_experts,
  index, mean_singular_value, se``; ``model`` is ``dense_<activation>``, ``moe`` or
  ``moe_uniform`` (the constant-gate control); ``n_experts`` is empty for the dense layer (0 would
  read as "a mixture of zero experts"); ``index`` is 0-based in descending order;
  ``se = std / sqrt(n_inputs)`` (sample std, ddof=1).
- :data:`FIGURE_FILE` ``spectra.png``: the mean spectra, drawn by
  :func:`moe_lab.experiments.jacobian.plot_jacobian_spectra`.
- :data:`RECORD_FILE` ``jacobian.json``: a :class:`JacobianRecord`. It is not a training run's
  ``summary.json``, so the sweep reader never takes a Jacobian run for a training run.

The experiment's settings type lives with the experiment
(:class:`moe_lab.experiments.jacobian.JacobianSettings`, which checks activation names against
``moe_lab.layers``); this module takes it as a parameter, so that reading a run dir needs neither
torch nor the layers. :func:`moe_lab.experiments.jacobian.read_record` reads a record with it.

Imports: the standard library and ``moe_lab.utils``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from moe_lab.utils.io import atomic_write_json

RECORD_FILE = "jacobian.json"
SPECTRA_FILE = "spectra.csv"
FIGURE_FILE = "spectra.png"
#: every file of a Jacobian run dir, in the order the run writes them
RUN_FILES = (SPECTRA_FILE, FIGURE_FILE, RECORD_FILE)
SPECTRA_COLUMNS = ("model", "n_experts", "index", "mean_singular_value", "se")
EXPERIMENT = "jacobian"


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class SpectrumStats:
    """One model's Jacobian statistics over the inputs (functions of
    :mod:`moe_lab.analysis.spectrum`, applied per input, then averaged)."""

    model: str = field(metadata=_doc("dense_<activation>, moe or moe_uniform"))
    n_experts: int | None = field(metadata=_doc("K; null for the dense layer"))
    numerical_rank: float = field(
        metadata=_doc(
            "number of singular values > max(s) * max(m, n) * eps(dtype) "
            "(numpy.linalg.matrix_rank's default), per input, averaged over inputs"
        )
    )
    numerical_rank_se: float = field(metadata=_doc("its std (ddof=1) over inputs / sqrt(n)"))
    effective_rank: float = field(
        metadata=_doc(
            "exp(entropy of p_i = s_i / sum(s)) (Roy & Vetterli 2007), per input, averaged"
        )
    )
    effective_rank_se: float = field(metadata=_doc("its std (ddof=1) over inputs / sqrt(n)"))
    median_condition_number: float | None = field(
        metadata=_doc(
            "median over inputs of s_max / s_min, where s_min at or below the rank tolerance "
            "counts as 0 (infinite condition); null = infinite (JSON has no infinity)"
        )
    )
    singular_fraction: float = field(
        metadata=_doc("fraction of inputs whose Jacobian is numerically singular")
    )


class RecordedSettings(Protocol):
    """What the record needs of the experiment's settings: their JSON form (with ``width``)."""

    def to_dict(self) -> dict[str, Any]: ...


class _Result(Protocol):
    @property
    def settings(self) -> Any: ...

    @property
    def models(self) -> Mapping[str, SpectrumStats]: ...


S = TypeVar("S", bound=RecordedSettings)


@dataclass
class JacobianRecord(Generic[S]):
    """``jacobian.json``: the record of one Jacobian-experiment run, written by :meth:`write` and
    read back by :meth:`read`.

    Attributes:
        settings: what the run computed (the JSON holds ``settings.to_dict()``).
        models: per model label, its :class:`SpectrumStats`.
        wall_time_s: seconds the run took (None when not timed).
        run_dir: where the run wrote its files.
        overrides: the Hydra overrides of the command.
        experiment: always ``"jacobian"``, so a reader can tell the record apart at a glance.
    """

    settings: S
    models: dict[str, SpectrumStats]
    wall_time_s: float | None = None
    run_dir: str | None = None
    overrides: list[str] = field(default_factory=list)
    experiment: str = EXPERIMENT

    @classmethod
    def from_result(cls, result: _Result, **extra: Any) -> JacobianRecord[Any]:
        """The record of a computed result (anything with ``settings`` and ``models``)."""
        return cls(settings=result.settings, models=dict(result.models), **extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; ``definitions`` documents every statistic (from :class:`SpectrumStats`)."""
        settings = self.settings.to_dict()
        return {
            "experiment": self.experiment,
            "settings": settings,
            "jacobian_shape": [settings["width"], settings["width"]],
            "definitions": {f.name: f.metadata["doc"] for f in fields(SpectrumStats)},
            "models": {label: asdict(stats) for label, stats in self.models.items()},
            "wall_time_s": self.wall_time_s,
            "run_dir": self.run_dir,
            "overrides": list(self.overrides),
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], settings: Callable[[Mapping[str, Any]], S]
    ) -> JacobianRecord[S]:
        """Parse :meth:`to_dict`'s object; ``settings`` turns the ``settings`` object into the
        experiment's settings (e.g. ``JacobianSettings.from_config``). A wrong kind or missing
        field raises ``ValueError``."""
        if data.get("experiment") != EXPERIMENT:
            raise ValueError(
                f"not a Jacobian record: experiment={data.get('experiment')!r}, "
                f"expected {EXPERIMENT!r}"
            )
        missing = [key for key in ("settings", "models") if key not in data]
        if missing:
            raise ValueError(f"Jacobian record is missing {missing}")
        stat_fields = {f.name for f in fields(SpectrumStats)}
        models = {}
        for label, stats in data["models"].items():
            if set(stats) != stat_fields:
                raise ValueError(
                    f"Jacobian record model {label!r} has fields {sorted(stats)}, "
                    f"expected {sorted(stat_fields)}"
                )
            models[label] = SpectrumStats(**stats)
        return cls(
            settings=settings(data["settings"]),
            models=models,
            wall_time_s=data.get("wall_time_s"),
            run_dir=data.get("run_dir"),
            overrides=list(data.get("overrides") or []),
        )

    def write(self, path: str | Path) -> Path:
        """Write the record atomically (strict JSON: no NaN or infinity)."""
        return atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def read(
        cls, path: str | Path, settings: Callable[[Mapping[str, Any]], S]
    ) -> JacobianRecord[S]:
        """Read ``path`` (a ``jacobian.json``, or a run dir holding one); ``settings`` as in
        :meth:`from_dict`."""
        return cls.from_dict(json.loads(record_path(path).read_text()), settings)


def record_path(path: str | Path) -> Path:
    """``path`` itself, or the record file in it when ``path`` is a dir."""
    path = Path(path)
    return path / RECORD_FILE if path.is_dir() else path
