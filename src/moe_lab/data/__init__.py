"""LightningDataModules for 1D, 2D and 3D classification data, the seed's augmentation, and an
on-device data path.

Datasets (``DATASETS`` maps the config name to the class):

========================  ==============  =======  =====================================
name                      input_shape     classes  source
========================  ==============  =======  =====================================
``mnist1d``               (1, 40)         10       ``mnist1d`` package, generated + cached
``digits``                (1, 8, 8)       10       scikit-learn ``load_digits`` (bundled)
``moving_digits``         (1, 8, 16, 16)  20       clips built from the digits, cached
``mnist``                 (1, 28, 28)     10       torchvision ``MNIST`` files
``fashion_mnist``         (1, 28, 28)     10       torchvision ``FashionMNIST`` files
``cifar10``               (3, 32, 32)     10       torchvision ``CIFAR10`` files
``cifar100``              (3, 32, 32)     100      torchvision ``CIFAR100`` files
========================  ==============  =======  =====================================
"""

from .augment import (
    RandomShiftFlip,
    max_shift_for,
    random_shift_flip,
    sample_shift_flip,
    shift_flip,
)
from .base import VAL_SPLIT_SEED, BaseDataModule
from .loaders import AugmentedTensorDataset, ResidentLoader, epoch_seed
from .offline import (
    DigitsDataModule,
    MNIST1DDataModule,
    MovingDigitsDataModule,
    digits_split,
    make_moving_digits,
)
from .vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

#: config name -> datamodule class
DATASETS: dict[str, type[BaseDataModule]] = {
    cls.name: cls
    for cls in (
        MNIST1DDataModule,
        DigitsDataModule,
        MovingDigitsDataModule,
        MNISTDataModule,
        FashionMNISTDataModule,
        CIFAR10DataModule,
        CIFAR100DataModule,
    )
}

__all__ = [
    "DATASETS",
    "VAL_SPLIT_SEED",
    "AugmentedTensorDataset",
    "BaseDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "MNIST1DDataModule",
    "MNISTDataModule",
    "MovingDigitsDataModule",
    "RandomShiftFlip",
    "ResidentLoader",
    "TorchvisionDataModule",
    "digits_split",
    "epoch_seed",
    "make_moving_digits",
    "max_shift_for",
    "random_shift_flip",
    "sample_shift_flip",
    "shift_flip",
]
