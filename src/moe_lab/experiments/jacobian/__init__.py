"""The Jacobian-spectrum experiment: input-output Jacobian spectra of one dense ReLU layer against
dense mixtures of experts with K experts (the original's second demo, reproduced and extended).

For each model and each input ``x ~ U(0, 1)^width`` the ``width x width`` Jacobian ``dy/dx`` is
computed with ``torch.func`` (``vmap`` of ``jacrev``) and its singular values are sorted. A run
(:func:`run_experiment`) gives a :class:`JacobianResult`; :func:`write_outputs` puts it in a run
dir as the spectra table, the figure (:func:`plot_jacobian_spectra`) and the record, whose names
and schemas :mod:`moe_lab.run.jacobian_record` holds; :func:`read_record` reads the record back.

The dense baseline is Keras' ``Dense``: Glorot-uniform kernel, zero bias (PyTorch's ``nn.Linear``
default init differs). The original's ``DenseMoE`` init with K = 1 is the same distribution, so
``moe_K1`` is a statistical twin of ``dense_relu`` (its gate is constant 1).

Modules: :mod:`.settings` (:class:`JacobianSettings`), :mod:`.models` (the compared models and
their inputs), :mod:`.compute` (Jacobians, spectra, statistics, :func:`run_experiment`),
:mod:`.plot` (the figure, matplotlib only), :mod:`.outputs` (the run dir's files). The entry point
is ``python -m moe_lab.jacobian`` (:mod:`moe_lab.jacobian`).
"""

from .compute import (
    JacobianResult,
    input_jacobians,
    run_experiment,
    singular_values,
    summarize_spectra,
)
from .models import DenseBaseline, ModelEntry, build_models, sample_inputs
from .outputs import format_table, read_record, record_from_dict, write_outputs
from .plot import plot_jacobian_spectra
from .settings import JacobianSettings

__all__ = [
    "DenseBaseline",
    "JacobianResult",
    "JacobianSettings",
    "ModelEntry",
    "build_models",
    "format_table",
    "input_jacobians",
    "plot_jacobian_spectra",
    "read_record",
    "record_from_dict",
    "run_experiment",
    "sample_inputs",
    "singular_values",
    "summarize_spectra",
    "write_outputs",
]
