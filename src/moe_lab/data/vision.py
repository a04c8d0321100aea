"""CIFAR-10, CIFAR-100, MNIST and Fashion-MNIST through torchvision's own dataset classes.

torchvision reads the files (and, with ``download=True``, fetches them); we only turn its arrays
into uint8 tensors ``(N, C, H, W)`` and turn its errors into one clear message that names the
expected path and the command that downloads the data.

On-disk layout under ``data_dir`` (torchvision's):

- CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; torchvision
  checks the md5 of every file against the published archive, so a changed or truncated file is
  reported as corrupt.
- CIFAR-100: ``cifar-100-python/{train, test, meta}`` (md5-checked as well).
- MNIST / Fashion-MNIST: the UNPACKED idx files ``MNIST/raw/{train,t10k}-{images-idx3,
  labels-idx1}-ubyte`` (``FashionMNIST/raw/...``); torchvision checks only that they exist, and a
  truncated file fails while parsing.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch
from torchvision import datasets

from ._io import ensure_writable_dir
from .base import BaseDataModule, Split

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "TorchvisionDataModule",
]

# What a damaged file makes torchvision's readers raise (md5 mismatch: RuntimeError; bad pickle
# or idx contents: the rest).
_READ_ERRORS = (
    RuntimeError,
    AssertionError,
    EOFError,
    KeyError,
    TypeError,
    ValueError,
    IndexError,
    UnicodeDecodeError,
    pickle.UnpicklingError,
    OSError,
)


class TorchvisionDataModule(BaseDataModule):
    """Base of the torchvision-backed datamodules: uint8 pixels scaled to [0, 1].

    Subclasses set :attr:`torchvision_class` and implement :meth:`dataset_folder`,
    :meth:`expected_files` and :meth:`_arrays`.
    """

    torchvision_class: ClassVar[type]
    pixel_max = 255.0

    def dataset_folder(self) -> Path:
        """The folder torchvision reads."""
        raise NotImplementedError

    def expected_files(self) -> list[Path]:
        """Every file torchvision needs, at its exact path."""
        raise NotImplementedError

    def _arrays(self, dataset: Any) -> Split:
        """torchvision dataset -> ``(x (N, C, H, W) uint8, y (N,) int64)``."""
        raise NotImplementedError

    def _archive_hint(self) -> str:
        """How to use an archive that is already on this machine (no network needed)."""
        return ""

    def source(self, split: str) -> str:
        return str(self.dataset_folder())

    def _get_it(self) -> str:
        folder = self.dataset_folder()
        return (
            f"To get it, run on a machine with internet `python -m moe_lab.train "
            f"data={type(self).name} data.download=true paths.data_dir=<dir>` and copy "
            f"<dir>/{folder.relative_to(self.data_dir)} to {folder}.{self._archive_hint()}"
        )

    def _prepare(self) -> None:
        if not self.download:
            return
        ensure_writable_dir(self.data_dir)
        try:
            for train in (True, False):
                self.torchvision_class(str(self.data_dir), train=train, download=True)
        except _READ_ERRORS as err:
            raise FileNotFoundError(
                f"{self.name}: downloading into {self.dataset_folder()} failed ({err}). "
                f"This machine may have no internet. {self._get_it()}"
            ) from None

    def _load_splits(self) -> tuple[Split, Split]:
        missing = [path for path in self.expected_files() if not path.is_file()]
        if missing and self.download:
            self._prepare()
            missing = [path for path in self.expected_files() if not path.is_file()]
        if missing:
            names = ", ".join(os.path.relpath(path, self.dataset_folder()) for path in missing)
            raise FileNotFoundError(
                f"{self.name}: dataset not found. torchvision's "
                f"{self.torchvision_class.__name__} expects it in {self.dataset_folder()}, "
                f"which lacks: {names}. {self._get_it()}"
            )
        splits: list[Split | None] = []
        for train in (True, False) if self.load_test else (True,):
            try:
                dataset = self.torchvision_class(str(self.data_dir), train=train, download=False)
                x, y = self._arrays(dataset)
            except _READ_ERRORS as err:
                raise ValueError(
                    f"{self.name}: the files in {self.dataset_folder()} are corrupt or truncated "
                    f"(torchvision: {type(err).__name__}: {err}). Delete that folder and get it "
                    f"again. {self._get_it()}"
                ) from None
            splits.append((x, y))
        return splits[0], splits[1] if self.load_test else None


class _CIFAR(TorchvisionDataModule):
    input_shape = (3, 32, 32)
    default_augment = True  # the seed's CIFAR protocol

    def dataset_folder(self) -> Path:
        return self.data_dir / self.torchvision_class.base_folder

    def expected_files(self) -> list[Path]:
        cls = self.torchvision_class
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [self.dataset_folder() / name for name in names]

    def _archive_hint(self) -> str:
        archive = self.data_dir / self.torchvision_class.filename
        return (
            f" If you already have {archive.name}, put it at {archive} and run with "
            "data.download=true: it is checked and unpacked without network."
        )

    def _arrays(self, dataset: Any) -> Split:
        x = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        y = torch.as_tensor(dataset.targets, dtype=torch.int64)
        return x, y


class CIFAR10DataModule(_CIFAR):
    """CIFAR-10 (torchvision ``CIFAR10``): input ``(3, 32, 32)``, 10 classes, 50k train / 10k test.

    The seed's dataset. ``augment`` defaults to True (the seed's random shifts + flips).
    """

    name = "cifar10"
    num_classes = 10
    torchvision_class = datasets.CIFAR10


class CIFAR100DataModule(_CIFAR):
    """CIFAR-100 (torchvision ``CIFAR100``, fine labels): input ``(3, 32, 32)``, 100 classes.

    ``augment`` defaults to True, as for CIFAR-10.
    """

    name = "cifar100"
    num_classes = 100
    torchvision_class = datasets.CIFAR100


class _MNISTLike(TorchvisionDataModule):
    input_shape = (1, 28, 28)
    num_classes = 10

    def dataset_folder(self) -> Path:
        return self.data_dir / self.torchvision_class.__name__

    def _raw_folder(self) -> Path:
        return self.dataset_folder() / "raw"

    def expected_files(self) -> list[Path]:
        # torchvision reads the unpacked files: the resource names without ".gz".
        raw = self._raw_folder()
        return [raw / os.path.splitext(name)[0] for name, _ in self.torchvision_class.resources]

    def _archive_hint(self) -> str:
        return (
            f" If you have the .gz files, put them in {self._raw_folder()} and run with "
            "data.download=true: they are checked and unpacked without network."
        )

    def _arrays(self, dataset: Any) -> Split:
        x = dataset.data
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 3:
            raise ValueError(f"expected uint8 images (N, 28, 28), got {type(x).__name__}")
        y = torch.as_tensor(dataset.targets, dtype=torch.int64)
        return x[:, None].contiguous(), y


class MNISTDataModule(_MNISTLike):
    """MNIST (torchvision ``MNIST``): input ``(1, 28, 28)``, 10 classes, 60k train / 10k test."""

    name = "mnist"
    torchvision_class = datasets.MNIST


class FashionMNISTDataModule(_MNISTLike):
    """Fashion-MNIST (torchvision ``FashionMNIST``): input ``(1, 28, 28)``, 10 classes."""

    name = "fashion_mnist"
    torchvision_class = datasets.FashionMNIST
