"""CIFAR-10/100, MNIST and Fashion-MNIST through the real torchvision classes, on tiny fake files
written here in torchvision's exact on-disk formats.

CIFAR: the real files are Python 2 pickles (protocol 2) of dicts whose keys are byte strings
(``b"data"``, ``b"labels"`` / ``b"fine_labels"``) and whose ``data`` is a uint8 numpy array, N x 3072
(1024 red, then green, then blue, each row-major 32x32). torchvision unpickles them with
``encoding="latin1"`` and checks every file's md5 against the published archive. Our fakes are
written the same way (:class:`Py2Pickler` emits byte strings as Python 2 ``str``); to load them we
replace ONLY torchvision's md5 table (``train_list``, ``test_list``, ``meta``) with the fakes' md5s
(``monkeypatch``): file discovery, the integrity check, unpickling and reshaping run as in
production. With the real md5 table the same files are reported as corrupt.

MNIST / Fashion-MNIST: big-endian idx files, unpacked (torchvision reads
``<root>/<Class>/raw/train-images-idx3-ubyte`` etc., checks only that they exist).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision import datasets

from moe_lab.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    ResidentLoader,
)


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` (BINSTRING opcodes), as the
    CIFAR files (made with Python 2's cPickle) have them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fake_cifar(root: Path, hundred: bool, n_per_file: int = 4, n_test: int = 6):
    """Write a tiny CIFAR-10 (5 train batches) or CIFAR-100 (one train file) under ``root``.

    Returns ``(train_rows, train_labels, test_rows, test_labels)`` as written.
    """
    rng = np.random.default_rng(7 if hundred else 3)
    classes = 100 if hundred else 10
    label_key = b"fine_labels" if hundred else b"labels"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)

    def batch(n: int, title: bytes):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        entry = {b"batch_label": title, label_key: labels, b"data": rows}
        entry[b"filenames"] = [b"img_%d.png" % i for i in range(n)]
        if hundred:
            entry[b"coarse_labels"] = [label // 5 for label in labels]
        return entry, rows, labels

    train_names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    train_rows, train_labels = [], []
    for name in train_names:
        entry, rows, labels = batch(n_per_file * (5 if hundred else 1), name.encode())
        (folder / name).write_bytes(py2_pickle(entry))
        train_rows.append(rows)
        train_labels += labels
    entry, test_rows, test_labels = batch(n_test, b"testing batch 1 of 1")
    (folder / ("test" if hundred else "test_batch")).write_bytes(py2_pickle(entry))
    if hundred:
        meta = {b"fine_label_names": [b"c%d" % i for i in range(100)]}
        meta[b"coarse_label_names"] = [b"s%d" % i for i in range(20)]
        (folder / "meta").write_bytes(py2_pickle(meta))
    else:
        meta = {b"label_names": [b"c%d" % i for i in range(10)], b"num_cases_per_batch": 4}
        (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return np.concatenate(train_rows), train_labels, test_rows, test_labels


def accept_fake_md5s(monkeypatch, cls, root: Path) -> None:
    """Replace torchvision's md5 table (and only it) with the md5s of the fake files."""
    folder = root / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
    meta = dict(cls.meta, md5=md5(folder / cls.meta["filename"]))
    monkeypatch.setattr(cls, "meta", meta)


def rows_to_image(row: np.ndarray) -> np.ndarray:
    """CIFAR row -> (3, 32, 32), by explicit indexing: pixel (c, i, j) is row[c*1024 + i*32 + j]."""
    image = np.empty((3, 32, 32), dtype=np.uint8)
    for c, i, j in itertools.product(range(3), range(32), range(32)):
        image[c, i, j] = row[c * 1024 + i * 32 + j]
    return image


@pytest.mark.parametrize(
    ("module", "tv_class", "hundred"),
    [(CIFAR10DataModule, datasets.CIFAR10, False), (CIFAR100DataModule, datasets.CIFAR100, True)],
)
def test_cifar_round_trips_through_torchvision(tmp_path, monkeypatch, module, tv_class, hundred):
    train_rows, train_labels, test_rows, test_labels = fake_cifar(tmp_path, hundred)
    accept_fake_md5s(monkeypatch, tv_class, tmp_path)
    datamodule = module(str(tmp_path))
    datamodule.prepare_data()
    datamodule.setup()
    train_x, train_y = datamodule.split("train")
    test_x, test_y = datamodule.split("test")
    assert train_x.shape == (20, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (6, 3, 32, 32)
    for k in (0, 7, 19):
        np.testing.assert_array_equal(train_x[k].numpy(), rows_to_image(train_rows[k]))
    np.testing.assert_array_equal(test_x[5].numpy(), rows_to_image(test_rows[5]))
    assert train_y.tolist() == train_labels and test_y.tolist() == test_labels
    x, y = next(iter(datamodule.test_dataloader()))  # never augmented, in order, in [0, 1]
    assert x.dtype == torch.float32 and torch.equal(x, test_x.float() / 255)
    assert y.tolist() == test_labels


def shift_flip_variants(image: np.ndarray, m: int):
    """Every (dy, dx, flip) variant of a (C, H, W) image: numpy edge-padding, a crop, a flip."""
    h, w = image.shape[1:]
    padded = np.pad(image, ((0, 0), (m, m), (m, m)), mode="edge")
    for dy, dx, flip in itertools.product(range(-m, m + 1), range(-m, m + 1), (False, True)):
        shifted = padded[:, m - dy : m - dy + h, m - dx : m - dx + w]
        yield (dy, dx, flip), (shifted[:, :, ::-1] if flip else shifted).copy()


@pytest.mark.parametrize("loader", ["torch", "resident"])
def test_cifar_training_batches_are_shifted_flipped_originals(tmp_path, monkeypatch, loader):
    """Each augmented training image is one of the shift/flip variants of a training image."""
    fake_cifar(tmp_path, hundred=False)
    accept_fake_md5s(monkeypatch, datasets.CIFAR10, tmp_path)
    datamodule = CIFAR10DataModule(str(tmp_path), loader=loader, batch_size=4)
    assert datamodule.augment  # the seed's default for CIFAR
    datamodule.setup()
    train_x, train_y = datamodule.split("train")
    variants = {}
    for image, label in zip(train_x.numpy(), train_y.tolist(), strict=True):
        for p, candidate in shift_flip_variants(image, 3):
            variants[candidate.tobytes()] = (label, p)
    seen_shifts = set()
    for x, y in datamodule.train_dataloader():
        assert x.shape == (4, 3, 32, 32)
        pixels = np.rint(x.numpy() * 255).astype(np.uint8)
        for image, label in zip(pixels, y.tolist(), strict=True):
            assert image.tobytes() in variants
            found_label, p = variants[image.tobytes()]
            assert found_label == label
            seen_shifts.add(p)
    assert len(seen_shifts) > 5  # augmented, not the identity


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: magic 0x0000 (type 0x08 = uint8) (ndim), dims as big-endian int32, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, class_name: str, n_train: int = 12, n_test: int = 5):
    raw = root / class_name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(11)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize(
    ("module", "class_name"),
    [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")],
)
def test_mnist_like_round_trip_through_torchvision(tmp_path, module, class_name):
    arrays = fake_mnist(tmp_path, class_name)
    datamodule = module(str(tmp_path), loader="resident", batch_size=4)
    datamodule.setup()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = datamodule.split(split)
        images, labels = arrays[prefix]
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == torch.uint8
        np.testing.assert_array_equal(x[:, 0].numpy(), images)
        np.testing.assert_array_equal(y.numpy(), labels.astype(np.int64))
    loader = datamodule.train_dataloader()
    assert isinstance(loader, ResidentLoader) and len(loader) == 3  # 12 // 4, drop_last
    x, _ = next(iter(loader))
    assert x.shape == (4, 1, 28, 28) and float(x.max()) <= 1.0


# ---------------------------------------------------------------- missing and broken files


def assert_one_clear_error(info, *needles: str) -> None:
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    error = info.value  # no chained torchvision trace below ours
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.parametrize(
    ("module", "folder", "first_file"),
    [
        (CIFAR10DataModule, "cifar-10-batches-py", "data_batch_1"),
        (CIFAR100DataModule, "cifar-100-python", "train"),
        (MNISTDataModule, "MNIST", "raw/train-images-idx3-ubyte"),
        (FashionMNISTDataModule, "FashionMNIST", "raw/train-images-idx3-ubyte"),
    ],
)
def test_missing_dataset_says_where_and_how(tmp_path, module, folder, first_file):
    datamodule = module(str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        datamodule.setup()
    command = f"python -m moe_lab.train data={module.name} data.download=true"
    assert_one_clear_error(info, str(tmp_path / folder), first_file, command)


def test_one_missing_cifar_file_is_named(tmp_path, monkeypatch):
    fake_cifar(tmp_path, hundred=False)
    accept_fake_md5s(monkeypatch, datasets.CIFAR10, tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks: data_batch_3\\."):
        CIFAR10DataModule(str(tmp_path)).setup()


def test_cifar_with_wrong_md5_is_reported_corrupt(tmp_path):
    fake_cifar(tmp_path, hundred=False)  # torchvision's real md5 table: the fakes do not match
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        CIFAR10DataModule(str(tmp_path)).setup()
    assert_one_clear_error(info, str(tmp_path / "cifar-10-batches-py"), "data.download=true")


def test_truncated_cifar_pickle_is_reported_corrupt(tmp_path, monkeypatch):
    fake_cifar(tmp_path, hundred=True)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:5000])  # md5 accepted below: the unpickling must fail
    accept_fake_md5s(monkeypatch, datasets.CIFAR100, tmp_path)
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        CIFAR100DataModule(str(tmp_path)).setup()
    assert_one_clear_error(info, str(tmp_path / "cifar-100-python"))


def test_truncated_mnist_file_is_reported_corrupt(tmp_path):
    fake_mnist(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        MNISTDataModule(str(tmp_path)).setup()
    assert_one_clear_error(info, str(tmp_path / "MNIST"))


def test_mnist_labels_out_of_range_are_rejected(tmp_path):
    fake_mnist(tmp_path, "FashionMNIST")
    write_idx(tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(5, 12))
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        FashionMNISTDataModule(str(tmp_path)).setup()


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    datamodule = CIFAR10DataModule(str(tmp_path), download=True)
    with pytest.raises(FileNotFoundError, match="downloading into") as info:
        datamodule.prepare_data()
    assert_one_clear_error(info, str(tmp_path / "cifar-10-batches-py"), "no route to host")


def test_download_into_unwritable_dir_names_it(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not a writable directory") as info:
        MNISTDataModule(str(blocker / "data"), download=True).prepare_data()
    assert str(blocker / "data") in str(info.value)
