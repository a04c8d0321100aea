"""The Jacobian-spectrum experiment: input-output Jacobian spectra of one dense ReLU layer against
dense mixtures of experts with K experts (the original's second demo, reproduced and extended).

For each model and each input ``x ~ U(0, 1)^width`` the ``width x width`` Jacobian ``dy/dx`` is
computed with ``torch.func`` (``vmap`` of ``jacrev``) and its singular values are sorted. A run
(:func:`run_experiment`) gives a :class:`JacobianResult`; :func:`write_outputs` puts it in a run
dir as

- ``spectra.csv`` (:data:`SPECTRA_COLUMNS`): ``model, n_experts, index, mean_singular_value, se``;
  ``model`` is ``dense_<activation>``, ``moe`` or ``moe_uniform`` (the constant-gate control);
  ``n_experts`` is empty for the dense layer (0 would read as "a mixture of zero experts");
  ``index`` is 0-based in descending order; ``se = std / sqrt(n_inputs)`` (sample std, ddof=1).
- ``spectra.png``: :func:`moe_lab.analysis.plots.plot_jacobian_spectra`.
- ``jacobian.json`` (:data:`RECORD_FILE`): a :class:`JacobianRecord`. It is not a training run's
  ``summary.json``, so the sweep reader never takes a Jacobian run for a training run.

The dense baseline is Keras' ``Dense``: Glorot-uniform kernel, zero bias (PyTorch's ``nn.Linear``
default init differs). The original's ``DenseMoE`` init with K = 1 is the same distribution, so
``moe_K1`` is a statistical twin of ``dense_relu`` (its gate is constant 1).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.func import jacrev, vmap

from moe_lab.analysis.spectrum import (
    condition_number,
    effective_rank,
    mean_spectrum,
    numerical_rank,
)
from moe_lab.layers import DenseMoE
from moe_lab.layers.options import Activation, resolve_activation
from moe_lab.utils.io import atomic_write, atomic_write_json, atomic_write_text

RECORD_FILE = "jacobian.json"
SPECTRA_FILE = "spectra.csv"
FIGURE_FILE = "spectra.png"
SPECTRA_COLUMNS = ("model", "n_experts", "index", "mean_singular_value", "se")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _check_int(value: Any, key: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r} ({hint})")
    return value


@dataclass(frozen=True)
class JacobianSettings:
    """The experiment's knobs, validated on construction (each error names its config key).

    Attributes:
        n_inputs: number of inputs ``x ~ U(0, 1)^width`` (>= 2, for a standard error).
        width: input and output size of every layer.
        n_experts: the K of each mixture, e.g. ``(1, 2, 5, 10, 20)``.
        expert_activation, gating_activation: the mixture's f and g (names as in
            :data:`moe_lab.layers.ACTIVATION_NAMES`).
        dense_activation: the dense baseline's activation.
        seed: seeds the inputs and, per model, the weights (a model's weights depend on the seed
            and its K only, not on the rest of the K list).
        dtype: ``"float32"`` (the original's precision) or ``"float64"``; also sets the ``eps`` of
            the rank tolerance.
        chunk_size: inputs per ``vmap`` chunk (``None``: all at once; lower it to save memory).
        num_threads: torch intra-op threads while the experiment runs (restored after); None
            keeps torch's setting. Default 1: the work is hundreds of tiny SVDs and GEMMs that
            gain little from threads, and on a busy CPU two spinning threads per op made the
            default run ~7x slower (23 s vs 3 s measured on the 2-core dev machine).
        uniform_gate_control: also run, per K, the same mixture with its gating kernel and bias
            set to zero, so every gate is the constant ``g(0)`` (1/K for softmax; model
            ``moe_uniform``). It separates what the input-dependent gate adds from what summing
            K ReLU experts adds.
    """

    n_inputs: int = 250
    width: int = 128
    n_experts: tuple[int, ...] = (1, 2, 5, 10, 20)
    expert_activation: str = "relu"
    gating_activation: str = "softmax"
    dense_activation: str = "relu"
    seed: int = 0
    dtype: str = "float32"
    chunk_size: int | None = None
    num_threads: int | None = 1
    uniform_gate_control: bool = False

    def __post_init__(self) -> None:
        _check_int(self.n_inputs, "n_inputs", 2, "the standard error needs two inputs or more")
        _check_int(self.width, "width", 1, "e.g. width=128")
        ks = self.n_experts
        if isinstance(ks, int) and not isinstance(ks, bool):
            ks = (ks,)
        if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
            raise ValueError(
                f"n_experts must be a non-empty list of integers, e.g. n_experts=[1,20]; got {ks!r}"
            )
        for k in ks:
            _check_int(k, "n_experts", 1, f"every entry is a number of experts; got {list(ks)}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"n_experts has repeated entries: {list(ks)}; list each K once")
        object.__setattr__(self, "n_experts", tuple(ks))
        for key in ("expert_activation", "gating_activation", "dense_activation"):
            resolve_activation(getattr(self, key), key)  # raises ValueError naming the key
        _check_int(self.seed, "seed", 0, "e.g. seed=0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.chunk_size is not None:
            _check_int(self.chunk_size, "chunk_size", 1, "or null to compute all inputs at once")
        if self.num_threads is not None:
            _check_int(self.num_threads, "num_threads", 1, "or null to keep torch's setting")
        if not isinstance(self.uniform_gate_control, bool):
            raise ValueError(
                f"uniform_gate_control must be true or false, got {self.uniform_gate_control!r}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | DictConfig) -> JacobianSettings:
        """Pick this experiment's keys from a (Hydra) config; other keys are ignored."""
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        names = cls.__dataclass_fields__
        values = {k: v for k, v in cfg.items() if k in names}
        if isinstance(values.get("n_experts"), list):
            values["n_experts"] = tuple(values["n_experts"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (``n_experts`` as a list)."""
        return {**asdict(self), "n_experts": list(self.n_experts)}

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def eps(self) -> float:
        """Machine epsilon of the Jacobians' dtype, used by the rank tolerance."""
        return float(torch.finfo(self.torch_dtype).eps)


# ---------------------------------------------------------------------------------------------
# Models, inputs, Jacobians
# ---------------------------------------------------------------------------------------------


class DenseBaseline(nn.Module):
    """``act(W x + b)`` as Keras' ``Dense(units, activation=...)`` builds it: Glorot-uniform
    ``W``, zero ``b``. Input ``(*, in_features)`` -> output ``(*, out_features)``."""

    def __init__(self, in_features: int, out_features: int, activation: str = "relu") -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.activation: Activation = resolve_activation(activation, "dense_activation")
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.linear(x), -1)


@dataclass
class ModelEntry:
    """One compared model: ``model`` ("dense_relu", "moe" or "moe_uniform"), its K (None for
    dense), the module."""

    model: str
    n_experts: int | None
    module: nn.Module

    @property
    def label(self) -> str:
        return self.model if self.n_experts is None else f"{self.model}_K{self.n_experts}"


def _derived_seed(seed: int, *tags: int) -> int:
    """A seed for one model that depends only on (seed, tags): models are reproducible one by one."""
    return int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0])


def build_models(settings: JacobianSettings) -> list[ModelEntry]:
    """The dense baseline, then one ``DenseMoE`` per K (each followed, with
    ``uniform_gate_control``, by its constant-gate twin), in ``settings.dtype``, without grads."""
    width = settings.width
    entries: list[ModelEntry] = []
    with torch.random.fork_rng(devices=[]):  # the layers draw from the global RNG
        torch.manual_seed(_derived_seed(settings.seed, 0))
        dense = DenseBaseline(width, width, settings.dense_activation)
        entries.append(ModelEntry(f"dense_{dense.activation.name}", None, dense))
        for k in settings.n_experts:
            torch.manual_seed(_derived_seed(settings.seed, 1, k))
            moe = DenseMoE(
                width,
                width,
                k,
                expert_activation=settings.expert_activation,
                gating_activation=settings.gating_activation,
            )
            entries.append(ModelEntry("moe", k, moe))
            if settings.uniform_gate_control:
                # same experts, gate logits all zero: softmax gives 1/K whatever the input
                twin = copy.deepcopy(moe)
                with torch.no_grad():
                    twin.gating_kernel.zero_()
                    if twin.gating_bias is not None:
                        twin.gating_bias.zero_()
                entries.append(ModelEntry("moe_uniform", k, twin))
    for entry in entries:
        entry.module.to(settings.torch_dtype).eval().requires_grad_(False)
    return entries


def sample_inputs(settings: JacobianSettings) -> Tensor:
    """``(n_inputs, width)`` draws from U(0, 1), seeded by ``settings.seed``.

    Drawn in float64 and cast, so float32 and float64 runs see the same points (up to rounding).
    """
    gen = torch.Generator().manual_seed(settings.seed)
    x = torch.rand(settings.n_inputs, settings.width, generator=gen, dtype=torch.float64)
    return x.to(settings.torch_dtype)


def input_jacobians(module: nn.Module, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """Per-input Jacobians ``J[n] = d module(x[n]) / d x[n]``.

    Args:
        module: maps ``(*, in)`` to ``(*, out)``, each row independently.
        x: ``(N, in)``.
        chunk_size: inputs per vmap chunk (None: all at once).

    Returns:
        ``(N, out, in)``.
    """
    if x.dim() != 2:
        raise ValueError(f"input_jacobians expects x of shape (N, in), got {tuple(x.shape)}")
    with torch.no_grad():  # jacrev builds its own graph; nothing outside needs one
        return vmap(jacrev(module), chunk_size=chunk_size)(x)


def singular_values(jac: Tensor) -> np.ndarray:
    """Singular values, descending, ``(N, min(out, in))``, computed in float64 (so the tiny ones of
    a float32 Jacobian are not lost to the SVD's own rounding)."""
    return torch.linalg.svdvals(jac.detach().to(torch.float64)).numpy()


# ---------------------------------------------------------------------------------------------
# Results and the record
# ---------------------------------------------------------------------------------------------


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


def summarize_spectra(
    s: np.ndarray, shape: tuple[int, int], eps: float, *, model: str, n_experts: int | None
) -> SpectrumStats:
    """Statistics of ``(n, r)`` spectra of ``m x n`` matrices (see :class:`SpectrumStats`)."""
    n = s.shape[0]
    ranks = numerical_rank(s, shape, eps).astype(np.float64)
    eranks = effective_rank(s)
    conds = condition_number(s, shape, eps)
    median_cond = float(np.median(conds))
    return SpectrumStats(
        model=model,
        n_experts=n_experts,
        numerical_rank=float(ranks.mean()),
        numerical_rank_se=float(ranks.std(ddof=1) / math.sqrt(n)),
        effective_rank=float(eranks.mean()),
        effective_rank_se=float(eranks.std(ddof=1) / math.sqrt(n)),
        median_condition_number=median_cond if math.isfinite(median_cond) else None,
        singular_fraction=float(np.isinf(conds).mean()),
    )


@dataclass
class JacobianResult:
    """What one run computed.

    Attributes:
        settings: the validated settings.
        singular_values: per model label, ``(n_inputs, width)`` sorted spectra.
        spectra: the table written to ``spectra.csv`` (columns :data:`SPECTRA_COLUMNS`).
        models: per model label (``dense_relu``, ``moe_K1``, ...), its statistics.
    """

    settings: JacobianSettings
    singular_values: dict[str, np.ndarray]
    spectra: pd.DataFrame
    models: dict[str, SpectrumStats] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per model: numerical rank, effective rank, median condition number."""
        rows = [
            {
                "model": label,
                "numerical_rank": m.numerical_rank,
                "effective_rank": m.effective_rank,
                "median_cond": (
                    math.inf if m.median_condition_number is None else m.median_condition_number
                ),
                "singular_frac": m.singular_fraction,
            }
            for label, m in self.models.items()
        ]
        return pd.DataFrame(rows)


@dataclass
class JacobianRecord:
    """``jacobian.json``: the record of one Jacobian-experiment run, written by
    :func:`write_outputs` and read back by :meth:`read`.

    Attributes:
        settings: what the run computed (the JSON holds :meth:`JacobianSettings.to_dict`).
        models: per model label, its :class:`SpectrumStats`.
        wall_time_s: seconds the run took (None when not timed).
        run_dir: where the run wrote its files.
        overrides: the Hydra overrides of the command.
        experiment: always ``"jacobian"``, so a reader can tell the record apart at a glance.
    """

    settings: JacobianSettings
    models: dict[str, SpectrumStats]
    wall_time_s: float | None = None
    run_dir: str | None = None
    overrides: list[str] = field(default_factory=list)
    experiment: str = "jacobian"

    @classmethod
    def from_result(cls, result: JacobianResult, **extra: Any) -> JacobianRecord:
        return cls(settings=result.settings, models=dict(result.models), **extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; ``definitions`` documents every statistic (from :class:`SpectrumStats`)."""
        return {
            "experiment": self.experiment,
            "settings": self.settings.to_dict(),
            "jacobian_shape": [self.settings.width, self.settings.width],
            "definitions": {f.name: f.metadata["doc"] for f in fields(SpectrumStats)},
            "models": {label: asdict(stats) for label, stats in self.models.items()},
            "wall_time_s": self.wall_time_s,
            "run_dir": self.run_dir,
            "overrides": list(self.overrides),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JacobianRecord:
        """Parse :meth:`to_dict`'s object; a wrong kind or missing field raises ``ValueError``."""
        if data.get("experiment") != "jacobian":
            raise ValueError(
                f"not a Jacobian record: experiment={data.get('experiment')!r}, expected 'jacobian'"
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
            settings=JacobianSettings.from_config(data["settings"]),
            models=models,
            wall_time_s=data.get("wall_time_s"),
            run_dir=data.get("run_dir"),
            overrides=list(data.get("overrides") or []),
        )

    def write(self, path: str | Path) -> Path:
        """Write the record atomically (strict JSON: no NaN or infinity)."""
        return atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> JacobianRecord:
        """Read ``path`` (a ``jacobian.json``, or a run dir holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / RECORD_FILE
        return cls.from_dict(json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------
# Experiment
# ---------------------------------------------------------------------------------------------


def run_experiment(settings: JacobianSettings | None = None, **overrides: Any) -> JacobianResult:
    """Build the models, compute every Jacobian spectrum and its statistics.

    ``run_experiment(n_inputs=50, width=32, n_experts=(1, 20))`` is shorthand for passing
    ``JacobianSettings(...)``.
    """
    if settings is None:
        settings = JacobianSettings(**overrides)
    elif overrides:
        raise ValueError("pass either settings or keyword overrides, not both")
    with _torch_threads(settings.num_threads):
        return _run(settings)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous number."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(settings: JacobianSettings) -> JacobianResult:
    x = sample_inputs(settings)
    shape = (settings.width, settings.width)
    spectra: dict[str, np.ndarray] = {}
    models: dict[str, SpectrumStats] = {}
    frames = []
    for entry in build_models(settings):
        s = singular_values(input_jacobians(entry.module, x, settings.chunk_size))
        spectra[entry.label] = s
        mean, se = mean_spectrum(s)
        frames.append(
            pd.DataFrame(
                {
                    "model": entry.model,
                    "n_experts": pd.array([entry.n_experts] * len(mean), dtype="Int64"),
                    "index": np.arange(len(mean)),
                    "mean_singular_value": mean,
                    "se": se,
                }
            )
        )
        models[entry.label] = summarize_spectra(
            s, shape, settings.eps, model=entry.model, n_experts=entry.n_experts
        )
    table = pd.concat(frames, ignore_index=True)[list(SPECTRA_COLUMNS)]
    return JacobianResult(settings, spectra, table, models)


# ---------------------------------------------------------------------------------------------
# Files and the end-of-run table
# ---------------------------------------------------------------------------------------------


def write_outputs(result: JacobianResult, output_dir: str | Path, **record: Any) -> dict[str, Path]:
    """Write ``spectra.csv``, ``spectra.png`` and ``jacobian.json`` atomically into ``output_dir``.

    ``record`` sets the :class:`JacobianRecord`'s other fields (``wall_time_s``, ``run_dir``,
    ``overrides``).
    """
    from moe_lab.analysis.plots import plot_jacobian_spectra  # matplotlib only when writing

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in (SPECTRA_FILE, FIGURE_FILE, RECORD_FILE)}
    atomic_write_text(paths[SPECTRA_FILE], result.spectra.to_csv(index=False))
    buf = BytesIO()
    plot_jacobian_spectra(result).savefig(buf, format="png", dpi=120)
    atomic_write(paths[FIGURE_FILE], lambda f: f.write(buf.getvalue()))
    JacobianRecord.from_result(result, **record).write(paths[RECORD_FILE])
    return paths


def format_table(result: JacobianResult | JacobianRecord) -> str:
    """The end-of-run table, one line per model; ``singular``: share of singular Jacobians."""
    w = max(len("model"), *(len(label) for label in result.models))
    lines = [
        f"{'model':<{w}} {'num. rank':>10} {'eff. rank':>10} {'median cond':>12} {'singular':>9}"
    ]
    for label, m in result.models.items():
        cond = m.median_condition_number
        cond_s = "inf" if cond is None else f"{cond:.3g}"
        lines.append(
            f"{label:<{w}} {m.numerical_rank:>10.2f} {m.effective_rank:>10.2f} "
            f"{cond_s:>12} {m.singular_fraction:>9.0%}"
        )
    return "\n".join(lines)
