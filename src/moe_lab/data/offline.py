"""Datasets that need no download: MNIST-1D (1D), scikit-learn's digits (2D) and moving digits
(3D clips built from the real digits)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import ensure_writable_dir, load_npz, save_npz_atomic
from .base import BaseDataModule, Split

__all__ = [
    "DIGITS_SPLIT_SEED",
    "MOVING_DIGITS_SEED",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "MovingDigitsDataModule",
    "digits_split",
    "make_moving_digits",
]

log = logging.getLogger(__name__)

#: ``random_state`` of the stratified digits train/test split (fixed, never the run seed).
DIGITS_SPLIT_SEED = 0
#: images in scikit-learn's digits.
DIGITS_TOTAL = 1797
#: size of the digits test split: 1797 images -> 1437 train / 360 test (20%).
DIGITS_TEST_SIZE = 360
#: seed of the moving-digits clip positions (fixed, never the run seed).
MOVING_DIGITS_SEED = 0
#: side of a scikit-learn digit image.
DIGIT_SIZE = 8


def _to_splits(arrays: dict[str, np.ndarray]) -> tuple[Split, Split | None]:
    """``(train, test)`` pairs of tensors; the test pair is None when ``arrays`` has no test
    arrays (a run built with ``load_test=False`` never reads them)."""

    def pair(x: str, y: str) -> Split:
        return torch.from_numpy(arrays[x]), torch.from_numpy(arrays[y].astype(np.int64))

    test = pair("test_x", "test_y") if "test_x" in arrays else None
    return pair("train_x", "train_y"), test


def _split_keys(shapes: dict[str, tuple[int, ...]], load_test: bool) -> dict[str, tuple[int, ...]]:
    """The arrays a run reads: the test arrays only when it scores the test set."""
    return {k: v for k, v in shapes.items() if load_test or not k.startswith("test_")}


def _cached(
    path: Path, shapes: dict[str, tuple[int, ...]], build: Any, load_test: bool = True
) -> dict[str, np.ndarray]:
    """Read the arrays of ``shapes`` from ``path`` (only the train arrays when ``load_test`` is
    False: an ``.npz`` reads each array on access, so the test arrays are never read); if the
    file is missing or stale, ``build()`` every array and write it atomically."""
    wanted = _split_keys(shapes, load_test)
    arrays = load_npz(path, tuple(wanted))
    if arrays is not None and all(arrays[k].shape == s for k, s in wanted.items()):
        return arrays
    if path.exists():
        log.warning("cache %s is unreadable or stale; regenerating it", path)
    ensure_writable_dir(path.parent)
    arrays = build()
    save_npz_atomic(path, **arrays)
    return {k: arrays[k] for k in wanted}


class MNIST1DDataModule(BaseDataModule):
    """MNIST-1D (Greydanus 2020): 1D signals of length 40, 10 classes, 4000 train / 1000 test.

    Generated locally by the ``mnist1d`` package with its default arguments
    (``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())``, its seed 42) once, then
    cached at ``<data_dir>/<name>/mnist1d.npz``. Values are as the package makes them: it
    standardises the whole dataset to mean 0 and standard deviation 1, so no further scaling.
    Input ``(1, 40)`` float32.
    """

    name = "mnist1d"
    input_shape = (1, 40)
    num_classes = 10
    n_train, n_test, length = 4000, 1000, 40
    generated = True

    def source(self, split: str) -> str:
        return str(self.cache_path)

    @property
    def cache_path(self) -> Path:
        """Where the generated dataset is cached."""
        return self.data_dir / self.name / "mnist1d.npz"

    @staticmethod
    def generate() -> dict[str, np.ndarray]:
        """Run the package's generator; restore the global RNG states it reseeds."""
        import mnist1d.data  # imported here: it pulls in matplotlib and requests

        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        return {
            "train_x": data["x"].astype(np.float32),
            "train_y": data["y"].astype(np.int64),
            "test_x": data["x_test"].astype(np.float32),
            "test_y": data["y_test"].astype(np.int64),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        shapes = {
            "train_x": (self.n_train, self.length),
            "train_y": (self.n_train,),
            "test_x": (self.n_test, self.length),
            "test_y": (self.n_test,),
        }
        return _cached(self.cache_path, shapes, self.generate, self.load_test)

    def _prepare(self) -> None:
        self._arrays()

    def _load_splits(self) -> tuple[Split, Split | None]:
        arrays = {k: v[:, None, :] if k.endswith("_x") else v for k, v in self._arrays().items()}
        return _to_splits(arrays)


def digits_split() -> dict[str, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16) split 1437 / 360, stratified
    by class, with the fixed ``random_state`` :data:`DIGITS_SPLIT_SEED`.

    Returns ``train_x (1437, 8, 8)`` / ``test_x (360, 8, 8)`` uint8 and ``train_y`` / ``test_y``
    int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # integers 0..16 stored as float64
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


class DigitsDataModule(BaseDataModule):
    """scikit-learn's bundled handwritten digits: input ``(1, 8, 8)``, 10 classes.

    No download and no cache (the data ships with scikit-learn). The train/test split is fixed:
    stratified, 1437 train / 360 test, ``random_state=DIGITS_SPLIT_SEED``; it never depends on the
    run seed. Pixels 0..16 are stored as uint8 and scaled to [0, 1] (divided by 16).
    """

    name = "digits"
    input_shape = (1, DIGIT_SIZE, DIGIT_SIZE)
    num_classes = 10
    pixel_max = 16.0

    def source(self, split: str) -> str:
        return "scikit-learn's bundled digits (sklearn.datasets.load_digits)"

    def _load_splits(self) -> tuple[Split, Split | None]:
        arrays = _split_keys(digits_split(), self.load_test)  # type: ignore[arg-type]
        arrays = {k: v[:, None] if k.endswith("_x") else v for k, v in arrays.items()}
        return _to_splits(arrays)


#: the directions of motion, in label order.
DIRECTIONS = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top")


def check_motion(frames: int, height: int, width: int, directions: int) -> None:
    """Raise ValueError, naming the values, for clips in which the 8x8 digit cannot move."""
    if directions not in (2, 4):
        raise ValueError(f"directions must be 2 or 4, got {directions!r}")
    if frames < 2 or height <= DIGIT_SIZE or width <= DIGIT_SIZE:
        raise ValueError(
            f"moving digits need frames >= 2 and height, width > {DIGIT_SIZE} (the 8x8 digit must "
            f"move), got frames={frames}, height={height}, width={width}"
        )


def make_moving_digits(
    images: np.ndarray,
    digit_labels: np.ndarray,
    *,
    frames: int = 8,
    height: int = 16,
    width: int = 16,
    directions: int = 2,
    seed: int = MOVING_DIGITS_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Clips of each digit moving across a blank canvas, one clip per digit and direction.

    Direction ``d`` (see :data:`DIRECTIONS`): 0 left->right, 1 right->left, 2 top->bottom,
    3 bottom->top. Along the motion axis the digit's top-left corner visits
    ``round(linspace(0, size - 8, frames))`` (reversed for directions 1 and 3), so direction 1 is
    exactly direction 0 played backwards; across it sits at an offset drawn once per digit from
    ``numpy.random.default_rng(seed)``, shared by all its clips.

    Label ``= digit * directions + d``: a clip and its time reversal have the same frames (so no
    single frame, nor any order-free summary of the frames, can tell the label) but different
    labels. Only the order of the frames does.

    Args:
        images: ``(N, 8, 8)`` digit images (uint8).
        digit_labels: ``(N,)`` digit classes 0..9.
        frames, height, width: clip size ``T, H, W``; H and W at least 9 (the digit must move).
        directions: 2 (horizontal only) or 4.
        seed: seed of the cross-motion offsets.

    Returns:
        clips ``(N * directions, 1, T, H, W)`` with the images' dtype (clip ``i * directions + d``
        is digit ``i`` moving in direction ``d``) and labels ``(N * directions,)`` int64.
    """
    check_motion(frames, height, width, directions)
    n = images.shape[0]
    if images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or digit_labels.shape != (n,):
        raise ValueError(
            f"expected images (N, 8, 8) and labels (N,), got {images.shape}, {digit_labels.shape}"
        )
    rng = np.random.default_rng(seed)
    across_y = rng.integers(0, height - DIGIT_SIZE + 1, size=n)  # for horizontal motion
    across_x = rng.integers(0, width - DIGIT_SIZE + 1, size=n)  # for vertical motion
    path_x = np.rint(np.linspace(0, width - DIGIT_SIZE, frames)).astype(int)
    path_y = np.rint(np.linspace(0, height - DIGIT_SIZE, frames)).astype(int)

    clips = np.zeros((n, directions, 1, frames, height, width), dtype=images.dtype)
    for i in range(n):
        for d in range(directions):
            for t in range(frames):
                if d < 2:
                    y, x = across_y[i], (path_x[t] if d == 0 else path_x[frames - 1 - t])
                else:
                    y, x = (path_y[t] if d == 2 else path_y[frames - 1 - t]), across_x[i]
                clips[i, d, 0, t, y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] = images[i]
    labels = digit_labels.astype(np.int64)[:, None] * directions + np.arange(directions)
    return clips.reshape(n * directions, 1, frames, height, width), labels.reshape(-1)


class MovingDigitsDataModule(BaseDataModule):
    """3D clips of real scikit-learn digits moving across a canvas: input ``(1, T, H, W)``.

    Built by :func:`make_moving_digits` from the fixed digits split of :class:`DigitsDataModule`
    (train clips from the 1437 train digits, test clips from the 360 test digits), so with the
    defaults (T=8, H=W=16, 2 directions) there are 2874 train / 720 test clips.

    Label ``= digit * directions + direction`` (``num_classes = 10 * directions``); direction 0 is
    left->right, 1 right->left (2 top->bottom, 3 bottom->top with ``directions=4``). A clip and its
    time reversal have identical frames and different labels: the label needs the time axis.

    Generated deterministically (fixed seeds, independent of the run seed) and cached at
    ``<data_dir>/<name>/moving_digits_t{T}_h{H}_w{W}_d{directions}.npz``. Pixels 0..16 stored as
    uint8, scaled to [0, 1].

    Args:
        frames, height, width, directions: see :func:`make_moving_digits`.
        **kwargs: :class:`~moe_lab.data.base.BaseDataModule`'s arguments.
    """

    name = "moving_digits"
    pixel_max = 16.0
    generated = True

    def source(self, split: str) -> str:
        return str(self.cache_path)

    def __init__(
        self,
        data_dir: str | Path,
        frames: int = 8,
        height: int = 16,
        width: int = 16,
        directions: int = 2,
        **kwargs: Any,
    ) -> None:
        for what, value in (("frames", frames), ("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{what} must be an int, got {value!r}")
        check_motion(frames, height, width, directions)
        self.frames, self.height, self.width, self.directions = frames, height, width, directions
        self.input_shape = (1, frames, height, width)
        self.num_classes = 10 * directions
        super().__init__(data_dir, **kwargs)

    @property
    def cache_path(self) -> Path:
        """Where the generated clips are cached."""
        stem = f"moving_digits_t{self.frames}_h{self.height}_w{self.width}_d{self.directions}"
        return self.data_dir / self.name / f"{stem}.npz"

    def generate(self) -> dict[str, np.ndarray]:
        """Build the train and test clips from the fixed digits split."""
        digits = digits_split()
        out: dict[str, np.ndarray] = {}
        for split, seed in (("train", MOVING_DIGITS_SEED), ("test", MOVING_DIGITS_SEED + 1)):
            out[f"{split}_x"], out[f"{split}_y"] = make_moving_digits(
                digits[f"{split}_x"],
                digits[f"{split}_y"],
                frames=self.frames,
                height=self.height,
                width=self.width,
                directions=self.directions,
                seed=seed,
            )
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        n_train = (DIGITS_TOTAL - DIGITS_TEST_SIZE) * self.directions
        n_test = DIGITS_TEST_SIZE * self.directions
        shapes = {
            "train_x": (n_train, *self.input_shape),
            "train_y": (n_train,),
            "test_x": (n_test, *self.input_shape),
            "test_y": (n_test,),
        }
        return _cached(self.cache_path, shapes, self.generate, self.load_test)

    def _prepare(self) -> None:
        self._arrays()

    def _load_splits(self) -> tuple[Split, Split | None]:
        return _to_splits(self._arrays())
