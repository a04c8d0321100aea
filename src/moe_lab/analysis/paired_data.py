"""Which test examples each final run of each arm got right: the data every paired statistic of
a comparison reads (:mod:`moe_lab.analysis.paired`, :mod:`moe_lab.analysis.bootstrap`).

For arm ``A``, replicate ``r`` (an independent tuning study), final seed ``j`` (the same seed in
every arm) and test example ``i``: ``correct[A][r, j, i] ∈ {0, 1}``; its run's accuracy is
``acc[A][r, j] = (1/N) Σ_i correct[A][r, j, i]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike


def as_correct(name: str, values: ArrayLike) -> np.ndarray:
    """``values`` as a read-only boolean array of shape ``(R, S, N)``; ValueError naming ``name``
    when it is not 3-D, is empty, or holds anything but 0 and 1."""
    array = np.asarray(values)
    if array.ndim != 3:
        raise ValueError(
            f"arm {name!r}: correct must have shape (replicates R, seeds S, examples N), got "
            f"shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"arm {name!r}: correct is empty, shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(
                f"arm {name!r}: correct must hold only 0/1 (or booleans); found "
                f"{np.unique(array[~np.isin(array, (0, 1))])[:5].tolist()}"
            )
        array = array.astype(bool)
    else:
        array = array.copy()
    array.flags.writeable = False
    return array


_AXES = ("replicates R", "seeds S", "examples N")


def _check_same_shape(
    name: str, shape: tuple[int, ...], ref: str, ref_shape: tuple[int, ...]
) -> None:
    """ValueError naming both arms, both shapes and the axes that differ."""
    if shape == ref_shape:
        return
    differs = ", ".join(
        f"{axis}: {a} vs {b}" for axis, a, b in zip(_AXES, shape, ref_shape, strict=True) if a != b
    )
    raise ValueError(
        f"arm {name!r} has correct of shape {shape} but arm {ref!r} has {ref_shape} ({differs}); "
        "every arm needs the same replicates R, seeds S and test examples N, in the same order"
    )


@dataclass(frozen=True)
class PairedData:
    """Per arm, which test examples each final run got right.

    ``correct[arm][r, j, i]`` is 1 (True) when the run of ``arm`` from replicate (tuning study)
    ``r`` with final seed ``j`` classifies test example ``i`` correctly. Every arm must have the
    same shape ``(R, S, N)`` (equal replicates, seeds and examples; R ≥ 1, S ≥ 1), with seed ``j``
    and example ``i`` meaning the same seed and example in every arm: that is what the pairing
    relies on. Arrays are copied to read-only booleans.

    Raises:
        ValueError: no arm, an array that is not 3-D or not 0/1, or shapes that differ (the
            message names the arm, both shapes and the axes that differ).
    """

    correct: Mapping[str, np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.correct:
            raise ValueError("PairedData needs at least one arm")
        checked = {
            str(name): as_correct(str(name), values) for name, values in self.correct.items()
        }
        ref = next(iter(checked))
        for name, array in checked.items():
            _check_same_shape(name, array.shape, ref, checked[ref].shape)
        object.__setattr__(self, "correct", checked)

    @classmethod
    def from_predictions(
        cls, predictions: Mapping[str, ArrayLike], labels: ArrayLike
    ) -> PairedData:
        """From each arm's predicted classes, shape ``(R, S, N)`` of ints, and the ``N`` labels.

        Raises:
            ValueError: ``labels`` is not 1-D, or an arm's last axis is not ``N`` long.
        """
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
        correct = {}
        for name, predicted in predictions.items():
            predicted = np.asarray(predicted)
            if predicted.ndim != 3 or predicted.shape[-1] != labels.shape[0]:
                raise ValueError(
                    f"arm {name!r}: predictions must have shape (R, S, N={labels.shape[0]}), got "
                    f"{predicted.shape}"
                )
            correct[name] = predicted == labels
        return cls(correct)

    @property
    def arms(self) -> list[str]:
        return list(self.correct)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(R, S, N)``, shared by every arm."""
        return next(iter(self.correct.values())).shape  # type: ignore[return-value]

    @property
    def n_replicates(self) -> int:
        return self.shape[0]

    @property
    def n_seeds(self) -> int:
        return self.shape[1]

    @property
    def n_examples(self) -> int:
        return self.shape[2]

    def accuracies(self, arm: str) -> np.ndarray:
        """``acc[r, j]``: the test accuracy of each final run of ``arm``, shape ``(R, S)``."""
        return run_accuracies(self.correct[arm])


def run_accuracies(correct: ArrayLike) -> np.ndarray:
    """``acc[r, j] = (1/N) Σ_i correct[r, j, i]``, shape ``(R, S)``."""
    return as_correct("arm", correct).mean(axis=2)


def pair_arrays(arm: ArrayLike, base: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_correct("arm", arm), as_correct("base", base)
    _check_same_shape("arm", a.shape, "base", b.shape)
    return a, b


def check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


__all__ = ["PairedData", "run_accuracies"]
