"""The offline datasets (mnist1d, digits, moving_digits) and the behaviour every datamodule shares:
attributes before setup, splits, caching, loaders, bad input."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from moe_lab.data import (
    DATASETS,
    BaseDataModule,
    DigitsDataModule,
    MNIST1DDataModule,
    MovingDigitsDataModule,
    ResidentLoader,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One data dir for the module, so mnist1d is generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


EXPECTED = {  # name: (input_shape, num_classes, spatial_dims)
    "mnist1d": ((1, 40), 10, 1),
    "digits": ((1, 8, 8), 10, 2),
    "moving_digits": ((1, 8, 16, 16), 20, 3),
    "mnist": ((1, 28, 28), 10, 2),
    "fashion_mnist": ((1, 28, 28), 10, 2),
    "cifar10": ((3, 32, 32), 10, 2),
    "cifar100": ((3, 32, 32), 100, 2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_attributes_exist_before_setup(name, tmp_path):
    datamodule = DATASETS[name](str(tmp_path / "never_created"))
    shape, classes, dims = EXPECTED[name]
    assert isinstance(datamodule, BaseDataModule) and datamodule.name == name
    assert datamodule.input_shape == shape
    assert datamodule.num_classes == classes and datamodule.spatial_dims == dims
    assert datamodule.augment is (name in {"cifar10", "cifar100"})
    assert not (tmp_path / "never_created").exists()  # construction touches no disk


# ---------------------------------------------------------------- mnist1d


def test_mnist1d_matches_the_package_and_is_cached(data_dir, monkeypatch):
    import mnist1d.data

    np_state, py_state = np.random.get_state(), random.getstate()
    datamodule = MNIST1DDataModule(str(data_dir))
    datamodule.prepare_data()
    datamodule.setup()
    # the generator reseeds numpy/random globally; the datamodule restores them
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))
    assert datamodule.cache_path == data_dir / "mnist1d" / "mnist1d.npz"
    assert datamodule.cache_path.is_file()

    reference = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    train_x, train_y = datamodule.split("train")
    test_x, test_y = datamodule.split("test")
    assert train_x.shape == (4000, 1, 40) and test_x.shape == (1000, 1, 40)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    np.testing.assert_array_equal(train_x[:, 0].numpy(), reference["x"].astype(np.float32))
    np.testing.assert_array_equal(test_x[:, 0].numpy(), reference["x_test"].astype(np.float32))
    np.testing.assert_array_equal(train_y.numpy(), reference["y"])
    np.testing.assert_array_equal(test_y.numpy(), reference["y_test"])
    assert set(train_y.tolist()) == set(range(10))

    # second construction: from the cache, never from the generator
    def fail(*args, **kwargs):
        raise AssertionError("mnist1d was regenerated instead of read from the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", fail)
    again = MNIST1DDataModule(str(data_dir))
    again.setup()
    assert torch.equal(again.split("train")[0], train_x)
    assert torch.equal(again.split("test")[1], test_y)


def test_mnist1d_val_split_is_fixed_and_disjoint(data_dir):
    full = MNIST1DDataModule(str(data_dir))
    full.setup()
    train_x, train_y = full.split("train")
    a = MNIST1DDataModule(str(data_dir), val_split=0.1, seed=0)
    b = MNIST1DDataModule(str(data_dir), val_split=0.1, seed=9)
    a.setup()
    b.setup()
    (tx, ty), (vx, vy) = a.split("train"), a.split("val")
    assert len(tx) == 3600 and len(vx) == 400
    assert torch.equal(vx, b.split("val")[0])  # the run seed does not move the split
    rows = {row.tobytes() for row in train_x.numpy()}
    held, kept = {r.tobytes() for r in vx.numpy()}, {r.tobytes() for r in tx.numpy()}
    assert len(rows) == 4000 and not held & kept and held | kept == rows
    assert sorted(ty.tolist() + vy.tolist()) == sorted(train_y.tolist())
    assert torch.equal(a.split("test")[0], full.split("test")[0])


def test_corrupt_generated_cache_is_regenerated(tmp_path):
    datamodule = MovingDigitsDataModule(str(tmp_path))
    datamodule.cache_path.parent.mkdir(parents=True)
    datamodule.cache_path.write_bytes(b"PK\x03\x04 truncated")
    datamodule.setup()
    assert datamodule.split("train")[0].shape == (2874, 1, 8, 16, 16)
    assert np.load(datamodule.cache_path)["train_x"].shape == (2874, 1, 8, 16, 16)


def test_unwritable_data_dir_names_the_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad_dir = blocker / "data"
    with pytest.raises(ValueError, match="not a writable directory") as info:
        MNIST1DDataModule(str(bad_dir)).prepare_data()
    assert str(bad_dir / "mnist1d") in str(info.value)


# ---------------------------------------------------------------- digits


def test_digits_fixed_stratified_split_of_the_real_images(tmp_path, sklearn_digits):
    images, labels = sklearn_digits
    a, b = DigitsDataModule(str(tmp_path), seed=0), DigitsDataModule(str(tmp_path), seed=123)
    a.setup()
    b.setup()
    (train_x, train_y), (test_x, test_y) = a.split("train"), a.split("test")
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert torch.equal(train_x, b.split("train")[0]) and torch.equal(test_y, b.split("test")[1])
    assert int(train_x.max()) <= 16 and int(train_x.min()) >= 0
    # stratified: every class has 20% of its images in the test split, +-1
    per_class = np.bincount(labels, minlength=10)
    np.testing.assert_allclose(np.bincount(test_y.numpy(), minlength=10), per_class * 0.2, atol=1)
    # the split is a partition of the real images, each with its own label
    source = {}
    for image, label in zip(images, labels, strict=True):
        source.setdefault(image.tobytes(), set()).add(int(label))
    seen = [
        (x[0].numpy().tobytes(), int(y))
        for x, y in zip(torch.cat([train_x, test_x]), torch.cat([train_y, test_y]), strict=True)
    ]
    assert all(label in source[key] for key, label in seen)
    assert sorted(key for key, _ in seen) == sorted(image.tobytes() for image in images)


def test_digits_batches_are_scaled_to_unit_range(tmp_path):
    datamodule = DigitsDataModule(str(tmp_path), batch_size=64)
    datamodule.setup()
    loader = datamodule.train_dataloader()
    assert isinstance(loader, DataLoader)  # auto on CPU = torch
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_allclose((x * 16).numpy(), np.rint((x * 16).numpy()), atol=1e-5)
    assert float(x.max()) == 1.0  # 16/16 occurs in any batch of digits


@pytest.mark.parametrize("loader", ["torch", "resident"])
def test_val_and_test_are_in_order_and_unaugmented(tmp_path, loader):
    datamodule = DigitsDataModule(str(tmp_path), loader=loader, augment=True, eval_batch_size=100)
    datamodule.setup()
    test_x, test_y = datamodule.split("test")
    for make in (datamodule.val_dataloader, datamodule.test_dataloader):
        batches = list(make())
        assert [len(y) for _, y in batches] == [100, 100, 100, 60]
        x = torch.cat([b[0] for b in batches])
        assert torch.equal(x, test_x.float() / 16)  # val_split=0: the test set, as stored
        assert torch.equal(torch.cat([b[1] for b in batches]), test_y)
    train = datamodule.train_dataloader()
    assert isinstance(train, ResidentLoader if loader == "resident" else DataLoader)
    assert len(train) == (1437 // 32 if loader == "resident" else -(-1437 // 32))


def test_drop_last_defaults_per_loader_and_can_be_set(tmp_path):
    torch_dm = DigitsDataModule(str(tmp_path), loader="torch")
    resident_dm = DigitsDataModule(str(tmp_path), loader="resident", drop_last=False)
    torch_dm.setup()
    resident_dm.setup()
    assert len(torch_dm.train_dataloader()) == 45  # ceil(1437 / 32): every sample
    assert len(resident_dm.train_dataloader()) == 45
    torch_dm.drop_last = True
    assert len(torch_dm.train_dataloader()) == 44


# ---------------------------------------------------------------- moving digits


def locate_digit(frame: np.ndarray, lookup: dict[bytes, int]) -> tuple[int, int, bytes]:
    """The single (y, x) where an 8x8 sklearn digit sits in a blank frame (explicit search)."""
    hits = []
    for y in range(frame.shape[0] - 7):
        for x in range(frame.shape[1] - 7):
            window = frame[y : y + 8, x : x + 8]
            rest = frame.copy()
            rest[y : y + 8, x : x + 8] = 0
            if window.tobytes() in lookup and not rest.any():
                hits.append((y, x, window.tobytes()))
    assert len(hits) == 1, f"expected one digit in the frame, found {len(hits)}"
    return hits[0]


def test_moving_digits_are_real_digits_moving_in_the_labelled_direction(tmp_path, sklearn_digits):
    images, labels = sklearn_digits
    lookup = {image.tobytes(): int(label) for image, label in zip(images, labels, strict=True)}
    datamodule = MovingDigitsDataModule(str(tmp_path))
    datamodule.setup()
    train_x, train_y = datamodule.split("train")
    test_x = datamodule.split("test")[0]
    assert train_x.shape == (2874, 1, 8, 16, 16) and test_x.shape == (720, 1, 8, 16, 16)
    assert train_x.dtype == torch.uint8 and set(train_y.tolist()) == set(range(20))
    rng = np.random.default_rng(0)
    for index in rng.choice(len(train_x), size=25, replace=False):
        clip, label = train_x[index, 0].numpy(), int(train_y[index])
        found = [locate_digit(frame, lookup) for frame in clip]
        assert len({key for _, _, key in found}) == 1  # one digit image throughout
        digit = lookup[found[0][2]]
        ys, xs = [y for y, _, _ in found], [x for _, x, _ in found]
        assert len(set(ys)) == 1 and xs[0] != xs[-1]
        direction = 0 if xs[-1] > xs[0] else 1
        assert xs == sorted(xs, reverse=direction == 1)  # monotonic motion
        assert {xs[0], xs[-1]} == {0, 8}  # crosses the whole canvas
        assert label == digit * 2 + direction


def test_moving_digits_label_needs_the_time_axis(tmp_path):
    datamodule = MovingDigitsDataModule(str(tmp_path))
    datamodule.setup()
    x, y = datamodule.split("train")
    reversed_clips = x.flip(2)  # time axis of (N, 1, T, H, W)
    # every clip's time reversal is also in the dataset, with a different label
    index_of = {clip.numpy().tobytes(): i for i, clip in enumerate(x)}
    for i in range(0, len(x), 97):
        j = index_of[reversed_clips[i].numpy().tobytes()]
        assert int(y[j]) != int(y[i]) and int(y[j]) // 2 == int(y[i]) // 2
        # the same frames (as a multiset), so no single frame can tell the two labels apart
        frames_i = sorted(frame.numpy().tobytes() for frame in x[i, 0])
        assert frames_i == sorted(frame.numpy().tobytes() for frame in x[j, 0])


def test_moving_digits_cache_and_four_directions(tmp_path, monkeypatch):
    import moe_lab.data.offline as offline

    four = MovingDigitsDataModule(str(tmp_path), directions=4, frames=6, height=12, width=14)
    assert four.input_shape == (1, 6, 12, 14) and four.num_classes == 40
    four.setup()
    x, y = four.split("test")
    assert x.shape == (1440, 1, 6, 12, 14) and set(y.tolist()) == set(range(40))
    assert four.cache_path.name == "moving_digits_t6_h12_w14_d4.npz" and four.cache_path.is_file()

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of read from the cache")

    monkeypatch.setattr(offline, "make_moving_digits", fail)
    again = MovingDigitsDataModule(str(tmp_path), directions=4, frames=6, height=12, width=14)
    again.setup()
    assert torch.equal(again.split("test")[0], x) and torch.equal(again.split("test")[1], y)


def test_moving_digits_trains_a_tiny_3d_cnn_to_tell_the_direction(tmp_path):
    """20 steps of a tiny 3D CNN (it sees the time axis) tell the direction far above the 50% any
    frame-level model is held to (the frames of both directions are the same)."""
    torch.manual_seed(0)
    datamodule = MovingDigitsDataModule(str(tmp_path), batch_size=64)
    datamodule.setup()
    model = torch.nn.Sequential(
        torch.nn.MaxPool3d((1, 2, 2)),
        torch.nn.Conv3d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool3d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4 * 4, 20),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to thread sync on a busy CPU
    try:
        for x, y in itertools.islice(datamodule.train_dataloader(), 20):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        correct_direction = total = 0
        with torch.no_grad():
            for x, y in datamodule.test_dataloader():
                predicted = model(x).argmax(1)
                correct_direction += int(((predicted % 2) == (y % 2)).sum())
                total += len(y)
    finally:
        torch.set_num_threads(threads)
    assert correct_direction / total > 0.9


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", ["..", "../escape", "a/b", "/abs", ".", "", "a\\b", "C:x"])
def test_names_that_escape_the_data_dir_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="name"):
        MNIST1DDataModule(str(tmp_path), name=bad)


def test_a_plain_name_override_moves_the_cache(tmp_path):
    datamodule = MovingDigitsDataModule(str(tmp_path), name="clips_v2")
    assert datamodule.cache_path.parent == tmp_path / "clips_v2"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loader": "gpu"}, "loader"),
        ({"val_split": 1.0}, "val_split"),
        ({"val_split": -0.1}, "val_split"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": -1}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"augment": True}, "2D images only"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MNIST1DDataModule(str(tmp_path), **kwargs)


def test_bad_moving_digits_geometry(tmp_path):
    with pytest.raises(ValueError, match="directions"):
        MovingDigitsDataModule(str(tmp_path), directions=3)
    with pytest.raises(ValueError, match="height, width > 8"):
        MovingDigitsDataModule(str(tmp_path), width=8)


def test_tiny_val_split_that_leaves_no_samples_is_rejected(tmp_path):
    datamodule = DigitsDataModule(str(tmp_path), val_split=0.0001)
    with pytest.raises(ValueError, match="at least one"):
        datamodule.setup()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_torch_path_augmentation_is_reproducible_and_changes_per_epoch(tmp_path, num_workers):
    """Same seed, same augmented epochs (also in worker processes); epochs and seeds differ."""

    def epochs(seed: int) -> list[torch.Tensor]:
        datamodule = DigitsDataModule(
            str(tmp_path), augment=True, seed=seed, num_workers=num_workers, batch_size=512
        )
        datamodule.setup()
        loader = datamodule.train_dataloader()
        return [torch.cat([x for x, _ in loader]) for _ in range(2)]

    first, again = epochs(1), epochs(1)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])
    if num_workers == 0:  # one more worker start-up is slow on a busy CPU; the seed path is shared
        assert not torch.equal(first[0], epochs(2)[0])


def test_hyperparameters_are_saved_for_checkpoints(tmp_path):
    datamodule = MovingDigitsDataModule(str(tmp_path), frames=6, batch_size=16, topology={"a": 1})
    assert datamodule.hparams["frames"] == 6 and datamodule.hparams["batch_size"] == 16
    assert datamodule.hparams["topology"] == {"a": 1}


@pytest.mark.parametrize("name", ["mnist1d", "moving_digits"])
def test_a_run_without_its_test_split_never_reads_the_test_arrays(name, data_dir, monkeypatch):
    """A tuning trial (``load_test=False``) reads only the cache's train arrays: an ``.npz``
    reads each array on access, and the test keys are never accessed."""
    datamodule_class = {"mnist1d": MNIST1DDataModule, "moving_digits": MovingDigitsDataModule}[name]
    datamodule_class(str(data_dir)).prepare_data()  # the cache exists, with every array
    read: list[str] = []
    real_getitem = np.lib.npyio.NpzFile.__getitem__

    def spy(self, key):
        read.append(key)
        return real_getitem(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    tuning = datamodule_class(str(data_dir), val_split=0.1, load_test=False)
    tuning.prepare_data()
    tuning.setup("fit")
    assert read and not [key for key in read if key.startswith("test")], read
    read.clear()
    scoring = datamodule_class(str(data_dir), val_split=0.1)
    scoring.setup("test")
    assert {"test_x", "test_y"} <= set(read)  # the spy sees a run that does read them
