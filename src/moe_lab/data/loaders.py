"""The two data paths: an ordinary per-sample dataset for ``torch.utils.data.DataLoader`` (the
reference) and :class:`ResidentLoader`, which keeps the whole split on one device and serves
augmented batches with batched tensor ops.

Both draw shifts and flips from the same distribution (:mod:`moe_lab.data.augment`); their random
streams differ, so the same seed gives different (equally distributed) batches on the two paths.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, get_worker_info

from .augment import RandomShiftFlip, sample_shift_flip, shift_flip

__all__ = ["AugmentedTensorDataset", "EpochRandomSampler", "ResidentLoader", "epoch_seed"]


def epoch_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``(seed, *keys)`` (e.g. ``(seed, epoch)``) by numpy's
    ``SeedSequence``: distinct keys give unrelated streams, equal keys the same stream."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def _to_float(x: Tensor, pixel_max: float) -> Tensor:
    x = x.to(torch.float32)
    # a division, not a multiplication by 1/255: x / 255 is the correctly rounded float
    return x.div_(pixel_max) if pixel_max != 1.0 else x


class AugmentedTensorDataset(Dataset):
    """In-memory samples, converted to float and augmented one at a time (DataLoader path).

    Args:
        images: ``(N, C, *spatial)`` stored values (uint8 or float).
        labels: ``(N,)`` int64.
        pixel_max: the stored value that means 1.0; items are ``stored / pixel_max`` (255 for
            uint8 pixels).
        augment: per-sample transform of the STORED image, ``(C, H, W), generator -> (C, H, W)``
            (applied before the cast to float, so uint8 shifts stay exact), or None.
        seed: seeds the augmentation stream in the main process. In a worker process the stream
            is seeded from ``torch.utils.data.get_worker_info().seed``, which the DataLoader
            derives from its own generator, so runs stay reproducible with ``num_workers > 0``.

    Item ``i``: ``(image (C, *spatial) float32, label int64 scalar tensor)``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        pixel_max: float = 1.0,
        augment: RandomShiftFlip | None = None,
        seed: int = 0,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels
        self.pixel_max = float(pixel_max)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self._generator: torch.Generator | None = None
        self._generator_seed: int | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Augment epoch ``epoch`` with its own stream (``epoch_seed(seed, epoch)``), so that a
        resumed run draws what the uninterrupted run drew (in the main process)."""
        self.epoch = int(epoch)

    def _get_generator(self) -> torch.Generator:
        info = get_worker_info()
        wanted = epoch_seed(self.seed, self.epoch) if info is None else info.seed
        if self._generator is None or self._generator_seed != wanted:
            self._generator = torch.Generator().manual_seed(wanted)
            self._generator_seed = wanted
        return self._generator

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image, generator=self._get_generator())
        return _to_float(image, self.pixel_max), self.labels[index]


class EpochRandomSampler(Sampler[int]):
    """A random permutation per epoch that depends only on ``(seed, epoch)``.

    Unlike ``shuffle=True`` with a generator (whose state runs on from epoch to epoch), epoch ``e``
    is the same permutation whether the run got there directly or was resumed from a checkpoint.
    Lightning calls :meth:`set_epoch` before every epoch; the epoch is passed on to ``dataset`` (if
    it has ``set_epoch``) so that per-sample augmentation follows the epoch too. (With
    ``num_workers > 0`` augmentation is seeded per worker instead: reproducible, but a resumed run
    augments differently from an uninterrupted one.)
    """

    def __init__(self, n: int, seed: int, dataset: object | None = None) -> None:
        self.n, self.seed, self.dataset, self.epoch = int(n), int(seed), dataset, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        # Without set_epoch calls (outside Lightning) each pass moves on to the next epoch.
        epoch, self.epoch = self.epoch, self.epoch + 1
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_dataset_epoch):
            set_dataset_epoch(epoch)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        yield from torch.randperm(self.n, generator=generator).tolist()


class ResidentLoader:
    """Batches from tensors that live on one device, with on-device shuffling and augmentation.

    Every epoch draws, on the data's device, one permutation of the split and one set of
    augmentation parameters for every position of it (from ``torch.Generator`` seeded by
    :func:`epoch_seed` ``(seed, epoch)``), then serves ``batch_size`` slices: an index_select, the
    batched :func:`~moe_lab.data.augment.shift_flip` gather, a cast. No per-sample Python.

    Epochs: ``set_epoch(e)`` picks the stream of epoch ``e``; iterating without it moves on to the
    next epoch by itself, so successive epochs differ and a run is reproducible from ``seed``.
    Lightning calls ``loader.sampler.set_epoch(current_epoch)`` before each epoch (its
    ``_set_sampler_epoch`` hook, meant for DistributedSampler); :attr:`sampler` returns this
    loader so that hook reaches us and a resumed run continues the same sequence.
    :attr:`batch_sampler` is None, so Lightning's DataLoader probes (``_is_dataloader_shuffled``
    reads ``batch_sampler`` once it sees a ``sampler``) find nothing to re-wrap.

    Sharding (DDP): the permutation and augmentation parameters are the same on every rank; rank
    ``r`` takes the ``r``-th contiguous slice of ``samples_per_rank`` positions. With
    ``drop_last`` the tail beyond ``world_size * samples_per_rank`` is dropped and every batch is
    full (static shapes); without it, the epoch order is padded by wrapping around (as
    ``DistributedSampler`` does) so every rank gets ``ceil(N / world_size)`` samples, and the last
    batch may be short. With one rank and no ``drop_last`` every sample is served exactly once.

    Args:
        images: ``(N, C, *spatial)`` uint8 or float; moved to ``device`` once.
        labels: ``(N,)`` integer.
        batch_size: samples per batch.
        shuffle: permute every epoch (False: dataset order).
        drop_last: drop the incomplete last batch (see Sharding).
        max_shift: ``(max_dy, max_dx)`` to augment 2D images (shift + flip), or None.
        flip_prob: probability of a horizontal flip when augmenting.
        pixel_max: batches are ``stored / pixel_max`` in float32 (255 for uint8 pixels).
        seed: base seed of shuffling and augmentation.
        rank, world_size: this process' place among the data-parallel ranks.
        device: where the data lives and batches are made (default: where ``images`` are).

    Yields:
        ``(x (batch, C, *spatial) float32, y (batch,) int64)`` on ``device``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        max_shift: Sequence[int] | None = None,
        flip_prob: float = 0.5,
        pixel_max: float = 1.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[0] == 0:
            raise ValueError("ResidentLoader needs at least one sample")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if max_shift is not None and images.ndim != 4:
            raise ValueError(
                "shift/flip augmentation needs 2D images (N, C, H, W), got shape "
                f"{tuple(images.shape)}"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.max_shift = None if max_shift is None else tuple(int(m) for m in max_shift)
        self.flip_prob = float(flip_prob)
        self.pixel_max = float(pixel_max)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, dtype=torch.long)
        n = self.num_samples
        if drop_last:
            self.samples_per_rank = n // world_size
        else:
            self.samples_per_rank = math.ceil(n / world_size)
        if self.samples_per_rank == 0 or (drop_last and self.samples_per_rank < batch_size):
            raise ValueError(
                f"{n} samples cannot fill one batch of {batch_size} on each of {world_size} "
                "rank(s) with drop_last=True; lower batch_size or set drop_last=False"
            )

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks together)."""
        return self.images.shape[0]

    #: no batch sampler: batches come from :meth:`epoch_plan` (read by Lightning's probes).
    batch_sampler = None

    @property
    def sampler(self) -> ResidentLoader:
        """This loader: lets Lightning's per-epoch ``sampler.set_epoch`` hook reach it."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffling/augmentation stream of ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def to(self, device: torch.device | str) -> ResidentLoader:
        """Move the data to ``device`` (in place); batches are made there from now on."""
        self.device = torch.device(device)
        self.images = self.images.to(self.device)
        self.labels = self.labels.to(self.device)
        return self

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """This rank's sample order and augmentation parameters for ``epoch``.

        Returns:
            order: ``(samples_per_rank,)`` int64 indices into the split.
            shifts: ``(samples_per_rank, 2)`` int64 ``(dy, dx)``, or None without augmentation.
            flips: ``(samples_per_rank,)`` bool, or None without augmentation.
        """
        n, total = self.num_samples, self.samples_per_rank * self.world_size
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(self.seed, epoch))
        if self.shuffle:
            order = torch.randperm(n, generator=generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        if total > n:  # pad by wrapping around so all ranks get the same count
            order = order.repeat(math.ceil(total / n))
        order = order[:total]
        shifts = flips = None
        if self.max_shift is not None:
            shifts, flips = sample_shift_flip(
                total,
                self.max_shift,
                flip_prob=self.flip_prob,
                generator=generator,
                device=self.device,
            )
        mine = slice(self.rank * self.samples_per_rank, (self.rank + 1) * self.samples_per_rank)
        if shifts is not None and flips is not None:
            shifts, flips = shifts[mine], flips[mine]
        return order[mine], shifts, flips

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: its body (and the epoch bump) runs on the first next(), not on iter(),
        # so Lightning probing iter(loader) does not skip an epoch.
        epoch = self.epoch
        self.epoch = epoch + 1
        order, shifts, flips = self.epoch_plan(epoch)
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[batch]
            x = self.images.index_select(0, index)
            if shifts is not None and flips is not None:
                x = shift_flip(x, shifts[batch], flips[batch])
            yield _to_float(x, self.pixel_max), self.labels.index_select(0, index)
