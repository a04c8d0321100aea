"""Common base of moe_lab's LightningDataModules: in-memory classification splits served by either
an ordinary DataLoader or the on-device :class:`~moe_lab.data.loaders.ResidentLoader`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from ._io import check_path_name
from .augment import RandomShiftFlip, max_shift_for
from .loaders import AugmentedTensorDataset, EpochRandomSampler, ResidentLoader, epoch_seed

__all__ = ["VAL_SPLIT_SEED", "BaseDataModule", "Split"]

#: Seed of the train/validation hold-out permutation. Fixed, NOT the run seed: every run of a
#: sweep validates on the same held-out samples.
VAL_SPLIT_SEED = 20240601

LOADERS = ("auto", "torch", "resident")

Split = tuple[Tensor, Tensor]


def _plain(obj: Any) -> Any:
    """Mappings -> dict, sequences -> list, recursively (turns OmegaConf containers into plain
    Python without importing omegaconf)."""
    if isinstance(obj, Mapping):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(value) for value in obj]
    return obj


class BaseDataModule(LightningDataModule):
    """A classification dataset held in memory, with the seed's augmentation and two loaders.

    Subclasses set the class attributes below and implement :meth:`_load_splits` (and
    :meth:`_prepare` when something must be generated or downloaded first).

    Attributes available right after construction (the model is built from them):
        name: the dataset's name (also the cache folder of generated datasets).
        input_shape: ``(C, *spatial)``, channels first.
        num_classes: number of labels; labels are ``0 .. num_classes - 1``.
        spatial_dims: 1, 2 or 3.
        topology: the CNN topology of this dataset's config (carried, not used, here).

    Args:
        data_dir: root folder of the data (raw downloads and generated caches).
        batch_size: training batch size.
        eval_batch_size: validation/test batch size; default ``max(256, batch_size)`` (no
            gradients, so bigger batches are cheaper).
        val_split: fraction of the training set held out for validation, chosen by a permutation
            seeded with :data:`VAL_SPLIT_SEED` (not the run seed). 0 (default, the seed's
            protocol): the test set is also the validation set.
        num_workers: DataLoader workers of the ``torch`` path.
        augment: random shifts + horizontal flips on training batches (2D images only). None:
            the dataset's default (True for CIFAR, as the seed; False elsewhere).
        download: let torchvision download missing files (needs internet).
        loader: ``"torch"`` (DataLoader, per-sample augmentation), ``"resident"``
            (:class:`~moe_lab.data.loaders.ResidentLoader`: data on the device, batched
            augmentation) or ``"auto"``: resident when the device is CUDA, else torch.
        seed: seed of shuffling and augmentation (not of the splits, which are fixed); None
            means 0.
        drop_last: drop the incomplete last training batch. None: True on the resident path
            (static shapes), False on the torch path (every sample every epoch, as the seed's
            Keras ``fit``). Validation and test never drop, shuffle or augment.
        topology: the model topology of the data config, stored for the model builder.
        load_test: False: the test split is never loaded or kept (a tuning trial must not see
            it); :meth:`test_dataloader` and ``split("test")`` then raise. Needs
            ``val_split > 0``, since otherwise validation would be the test set.
        name: override :attr:`name` (must be a plain folder name: no ``..``, no separators).

    The device: the dataloader hooks read ``self.trainer.strategy.root_device`` (Lightning attaches
    the trainer to the datamodule) and the data-parallel rank/world size from the trainer; call
    :meth:`to_device` to choose the device yourself (e.g. without a trainer).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    default_augment: ClassVar[bool] = False
    #: the stored value that means 1.0: floats are ``stored / pixel_max`` (255 for uint8 pixels).
    pixel_max: ClassVar[float] = 1.0

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_split: float = 0.0,
        num_workers: int = 0,
        augment: bool | None = None,
        download: bool = False,
        loader: str = "auto",
        seed: int | None = 0,
        drop_last: bool | None = None,
        topology: Mapping[str, Any] | None = None,
        name: str | None = None,
        load_test: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if name is not None:
            self.name = name
        check_path_name(self.name)
        if not isinstance(data_dir, (str, Path)) or not str(data_dir):
            raise ValueError(f"data_dir must be a non-empty path, got {data_dir!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = self._positive_int(batch_size, "batch_size")
        self.eval_batch_size = (
            max(256, self.batch_size)
            if eval_batch_size is None
            else self._positive_int(eval_batch_size, "eval_batch_size")
        )
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)):
            raise ValueError(f"val_split must be a fraction in [0, 1), got {val_split!r}")
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be a fraction in [0, 1), got {val_split}")
        self.val_split = float(val_split)
        self.load_test = bool(load_test)
        if not self.load_test and self.val_split <= 0:
            raise ValueError(
                "load_test=False needs a held-out validation split (val_split > 0): with "
                "val_split=0 validation is the test set"
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.augment = self.default_augment if augment is None else bool(augment)
        if self.augment and self.spatial_dims != 2:
            raise ValueError(
                f"augment=True is defined for 2D images only (random shifts + horizontal flips); "
                f"{self.name} is {self.spatial_dims}D. Set data.augment=false."
            )
        self.download = bool(download)
        if loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
        self.loader = loader
        if seed is None:  # an unset run seed (``seed: null`` in the config)
            seed = 0
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0 (or None for 0), got {seed!r}")
        self.seed = seed
        self.drop_last = drop_last
        self.topology = None if topology is None else _plain(topology)
        self._device: torch.device | None = None
        self._splits: dict[str, Split] | None = None

    @staticmethod
    def _positive_int(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
        return value

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (1, 2 or 3)."""
        return len(self.input_shape) - 1

    @property
    def max_shift(self) -> tuple[int, ...]:
        """Largest augmentation shift per spatial axis (10% of the size, rounded)."""
        return max_shift_for(self.input_shape[1:])

    # ----------------------------------------------------------------- subclass hooks
    def _prepare(self) -> None:
        """Generate or download what :meth:`_load_splits` needs (called by prepare_data)."""

    def _load_splits(self) -> tuple[Split, Split]:
        """Return ``((train_x, train_y), (test_x, test_y))``: ``x (N, *input_shape)`` uint8 or
        float (divided by :attr:`pixel_max` on the way out), ``y (N,)`` int64. When
        :attr:`load_test` is False the test pair may be None (and is dropped if it is not)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Generate/download on one process per node (Lightning calls it before setup)."""
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits once (all stages share them) and hold out the validation part."""
        if self._splits is not None:
            return
        (train_x, train_y), test = self._load_splits()
        checked = [("train", train_x, train_y)]
        if self.load_test:
            test_x, test_y = test
            checked.append(("test", test_x, test_y))
        del test  # a run without its test split keeps no reference to it
        for what, x, y in checked:
            self._check_split(what, x, y)
        splits = {"test": (test_x, test_y)} if self.load_test else {}
        if self.val_split > 0:
            n = train_x.shape[0]
            n_val = round(self.val_split * n)
            if not 1 <= n_val < n:
                raise ValueError(
                    f"val_split={self.val_split} of {n} training samples leaves {n_val} for "
                    "validation and needs at least one on each side; pick a different val_split"
                )
            generator = torch.Generator().manual_seed(VAL_SPLIT_SEED)
            perm = torch.randperm(n, generator=generator)
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            splits["train"] = (train_x[train_idx], train_y[train_idx])
            splits["val"] = (train_x[val_idx], train_y[val_idx])
        else:
            splits["train"] = (train_x, train_y)
            splits["val"] = splits["test"]
        self._splits = splits

    def source(self, split: str) -> str:
        """Where ``split`` ("train" or "test") is read from, for error messages."""
        return f"the {self.name} files under {self.data_dir}"

    #: the files are a cache this package generated: deleting them regenerates them
    generated: ClassVar[bool] = False

    def _bad_data(self, split: str, problem: str) -> ValueError:
        fix = (
            "It is a generated cache: delete it and the next run regenerates it."
            if self.generated
            else "The files under the data dir do not hold this dataset, or are damaged: get them "
            "again."
        )
        return ValueError(f"{self.name} {split} split ({self.source(split)}): {problem}. {fix}")

    def _check_split(self, what: str, x: Tensor, y: Tensor) -> None:
        """Shapes, finite inputs and labels in ``0 .. num_classes - 1``, once at load."""
        if tuple(x.shape[1:]) != tuple(self.input_shape) or x.shape[0] != y.shape[0]:
            raise self._bad_data(
                what,
                f"images {tuple(x.shape)} and labels {tuple(y.shape)}, expected "
                f"(N, {', '.join(map(str, self.input_shape))}) and (N,)",
            )
        if x.is_floating_point():
            finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()
                values = x[bad].reshape(len(bad), -1)
                n_nan, n_inf = int(values.isnan().sum()), int(values.isinf().sum())
                raise self._bad_data(
                    what,
                    f"inputs hold {n_nan} NaN and {n_inf} infinite values in {len(bad)} samples "
                    f"(first: sample {int(bad[0])})",
                )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            out = ((y < 0) | (y >= self.num_classes)).nonzero().flatten()
            raise self._bad_data(
                what,
                f"labels span {int(y.min())}..{int(y.max())}, outside 0..{self.num_classes - 1} "
                f"({len(out)} samples, first: sample {int(out[0])})",
            )

    def split(self, which: str) -> Split:
        """The stored ``(x, y)`` of ``"train"``, ``"val"`` or ``"test"`` (after setup)."""
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        if which == "test" and not self.load_test:
            raise RuntimeError(
                f"{self.name} was built without its test split (load_test=False: a tuning run "
                "never sees the test set)"
            )
        if which not in self._splits:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {which!r}")
        return self._splits[which]

    # ----------------------------------------------------------------- device and loaders
    def to_device(self, device: torch.device | str) -> BaseDataModule:
        """Make the resident path build its batches on ``device`` (overrides the trainer's)."""
        self._device = torch.device(device)
        return self

    @property
    def device(self) -> torch.device:
        """The device batches are for: :meth:`to_device`'s, else the trainer's root device, else
        CPU."""
        if self._device is not None:
            return self._device
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cpu")

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def resolved_loader(self) -> str:
        """``"torch"`` or ``"resident"``: what ``loader`` means for :attr:`device`."""
        if self.loader == "auto":
            return "resident" if self.device.type == "cuda" else "torch"
        return self.loader

    def _make_loader(self, which: str, train: bool) -> DataLoader | ResidentLoader:
        x, y = self.split(which)
        augment = train and self.augment
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.resolved_loader() == "resident":
            rank, world_size = self._rank_world()
            return ResidentLoader(
                x,
                y,
                batch_size,
                shuffle=train,
                drop_last=train and self.drop_last is not False,
                max_shift=self.max_shift if augment else None,
                pixel_max=self.pixel_max,
                seed=self.seed,
                rank=rank,
                world_size=world_size,
                device=self.device,
            )
        rank, _ = self._rank_world()
        dataset = AugmentedTensorDataset(
            x,
            y,
            pixel_max=self.pixel_max,
            augment=RandomShiftFlip(self.max_shift) if augment else None,
            seed=epoch_seed(self.seed, rank),  # ranks draw different augmentations
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochRandomSampler(len(dataset), self.seed, dataset) if train else None,
            drop_last=train and bool(self.drop_last),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.device.type == "cuda",
            # seeds the worker processes' augmentation streams
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader | ResidentLoader:
        """Shuffled, augmented (if ``augment``) training batches ``(x float32, y int64)``."""
        return self._make_loader("train", train=True)

    def val_dataloader(self) -> DataLoader | ResidentLoader:
        """Validation batches in order, never augmented (the test set when ``val_split == 0``)."""
        return self._make_loader("val", train=False)

    def test_dataloader(self) -> DataLoader | ResidentLoader:
        """Test batches in order, never augmented."""
        return self._make_loader("test", train=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, data_dir={str(self.data_dir)!r}, "
            f"batch_size={self.batch_size}, loader={self.loader!r}, augment={self.augment})"
        )
