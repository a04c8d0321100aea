"""Augmentation and the two data paths: exactness against explicit indexing, the same
distribution on both paths (chi-square), and the resident loader's epochs, seeds and sharding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader

from moe_lab.data import (
    AugmentedTensorDataset,
    RandomShiftFlip,
    ResidentLoader,
    max_shift_for,
    shift_flip,
)

P_MIN = 1e-3  # chi-square tests: reject only below this p-value (fixed seeds: deterministic)


def reference_shift_flip(image: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
    """The definition, pixel by pixel: content moves (dy, dx), edges repeat, then a flip."""
    c, h, w = image.shape
    out = np.empty_like(image)
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                jj = w - 1 - j if flip else j
                src_i = min(max(i - dy, 0), h - 1)
                src_j = min(max(jj - dx, 0), w - 1)
                out[ch, i, j] = image[ch, src_i, src_j]
    return out


def all_candidates(image: np.ndarray, max_shift: tuple[int, int]) -> tuple[list, np.ndarray]:
    params = list(
        itertools.product(
            range(-max_shift[0], max_shift[0] + 1),
            range(-max_shift[1], max_shift[1] + 1),
            (False, True),
        )
    )
    images = np.stack([reference_shift_flip(image, *p) for p in params])
    return params, images


def recover_params(
    outputs: np.ndarray, image: np.ndarray, max_shift: tuple[int, int]
) -> np.ndarray:
    """(dy, dx, flip) of every output, found by EXACT match with one reference candidate."""
    params, candidates = all_candidates(image, max_shift)
    flat = candidates.reshape(len(params), -1).astype(np.float64)
    assert len(np.unique(flat, axis=0)) == len(params), "test image must make candidates distinct"
    projection = np.random.default_rng(0).standard_normal(flat.shape[1])
    keys = flat @ projection
    out_flat = outputs.reshape(len(outputs), -1).astype(np.float64)
    nearest = np.abs(out_flat @ projection - keys[:, None]).argmin(axis=0)
    np.testing.assert_array_equal(out_flat, flat[nearest])  # each output IS a candidate
    return np.array([params[k] for k in nearest], dtype=np.int64)


def distinct_image(c: int, h: int, w: int) -> torch.Tensor:
    """uint8 image whose pixels are all different (needs c*h*w <= 256)."""
    g = torch.Generator().manual_seed(1)
    return torch.randperm(256, generator=g)[: c * h * w].to(torch.uint8).reshape(c, h, w)


def test_max_shift_is_ten_percent_rounded():
    assert max_shift_for((32, 32)) == (3, 3)
    assert max_shift_for((28, 28)) == (3, 3)
    assert max_shift_for((8, 8)) == (1, 1)
    assert max_shift_for((25, 35)) == (3, 4)  # 2.5 rounds up, 3.5 rounds up
    with pytest.raises(ValueError, match="fraction"):
        max_shift_for((32, 32), fraction=1.5)


def test_shift_flip_matches_explicit_indexing():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 7, 9), generator=g, dtype=torch.uint8)
    shifts = torch.tensor([[0, 0], [2, -3], [-2, 3], [6, 8], [-7, -9], [1, 0]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = shift_flip(images, shifts, flips)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for b in range(6):
        expected = reference_shift_flip(images[b].numpy(), *shifts[b].tolist(), bool(flips[b]))
        np.testing.assert_array_equal(out[b].numpy(), expected)


def test_shift_flip_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        shift_flip(torch.zeros(3, 4, 4), torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shifts must be"):
        shift_flip(torch.zeros(3, 1, 4, 4), torch.zeros(2, 2), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_shift"):
        RandomShiftFlip((1, -1))


def draws_torch_path(image: torch.Tensor, n: int, max_shift: tuple[int, int]) -> np.ndarray:
    dataset = AugmentedTensorDataset(
        image.expand(n, *image.shape),
        torch.arange(n),
        pixel_max=255,
        augment=RandomShiftFlip(max_shift),
        seed=0,
    )
    loader = DataLoader(dataset, batch_size=500, shuffle=True, generator=torch.Generator())
    return torch.cat([x for x, _ in loader]).numpy()


def draws_resident_path(
    image: torch.Tensor, n: int, max_shift: tuple[int, int], device: str = "cpu"
) -> np.ndarray:
    loader = ResidentLoader(
        image.expand(n, *image.shape),
        torch.arange(n),
        500,
        drop_last=False,
        max_shift=max_shift,
        pixel_max=255,
        seed=0,
        device=device,
    )
    batches = [x for x, _ in loader]
    assert all(x.device.type == torch.device(device).type for x in batches)
    return torch.cat(batches).cpu().numpy()


def to_pixels(x: np.ndarray) -> np.ndarray:
    """Float batches (uint8 / 255) back to integer pixel values, checking the scale on the way."""
    pixels = np.rint(x.astype(np.float64) * 255)
    np.testing.assert_allclose(x * 255, pixels, atol=1e-3)
    return pixels.astype(np.int64)


def check_same_distribution(a: np.ndarray, b: np.ndarray, max_shift: tuple[int, int]) -> None:
    """Both parameter samples uniform over the (dy, dx, flip) grid and alike (chi-square)."""
    n_dy, n_dx = 2 * max_shift[0] + 1, 2 * max_shift[1] + 1

    def joint_counts(p: np.ndarray) -> np.ndarray:
        cell = ((p[:, 0] + max_shift[0]) * n_dx + (p[:, 1] + max_shift[1])) * 2 + p[:, 2]
        return np.bincount(cell, minlength=n_dy * n_dx * 2)

    counts_a, counts_b = joint_counts(a), joint_counts(b)
    assert stats.chisquare(counts_a).pvalue > P_MIN  # uniform over all 70 cells
    assert stats.chisquare(counts_b).pvalue > P_MIN
    assert stats.chi2_contingency(np.stack([counts_a, counts_b])).pvalue > P_MIN
    for axis, size in ((0, n_dy), (1, n_dx)):
        for p in (a, b):
            marginal = np.bincount(p[:, axis] + max_shift[axis], minlength=size)
            assert stats.chisquare(marginal).pvalue > P_MIN
    for p in (a, b):
        assert stats.binomtest(int(p[:, 2].sum()), len(p), 0.5).pvalue > P_MIN


def test_both_paths_give_exact_augmentations_from_the_same_distribution():
    max_shift = (2, 3)  # non-square on purpose: an axis mix-up changes the histogram
    image = distinct_image(1, 12, 20)
    n = 3500  # 50 expected per (dy, dx, flip) cell
    reference = image.numpy().astype(np.int64)
    torch_draws = to_pixels(draws_torch_path(image, n, max_shift))
    resident_draws = to_pixels(draws_resident_path(image, n, max_shift))
    torch_params = recover_params(torch_draws, reference, max_shift)
    resident_params = recover_params(resident_draws, reference, max_shift)
    check_same_distribution(torch_params, resident_params, max_shift)


def test_chi_square_check_detects_a_wrong_shift_range():
    """The distribution check above can fail: a path with shifts in [-m, m) is rejected."""
    max_shift = (2, 3)
    g = torch.Generator().manual_seed(0)
    good = np.stack(
        [
            torch.randint(-2, 3, (3500,), generator=g).numpy(),
            torch.randint(-3, 4, (3500,), generator=g).numpy(),
            (torch.rand(3500, generator=g) < 0.5).long().numpy(),
        ],
        axis=1,
    )
    bad = good.copy()
    bad[:, 1] = torch.randint(-3, 3, (3500,), generator=g).numpy()  # never +3
    with pytest.raises(AssertionError):
        check_same_distribution(good, bad, max_shift)


def make_loader(n: int = 103, batch_size: int = 10, **kwargs) -> ResidentLoader:
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1)  # image i holds the value i
    return ResidentLoader(images, torch.arange(n), batch_size, **kwargs)


def epoch_labels(loader: ResidentLoader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


def test_resident_static_shapes_with_drop_last():
    loader = make_loader(n=103, batch_size=10, drop_last=True)
    shapes = [tuple(x.shape) for x, _ in loader]
    assert len(loader) == len(shapes) == 10
    assert set(shapes) == {(10, 1, 1)}
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(x.flatten().numpy(), y.numpy())  # images travel with labels


def test_resident_serves_every_sample_once_without_drop_last():
    loader = make_loader(n=103, batch_size=10, drop_last=False)
    batches = epoch_labels(loader)
    assert len(loader) == len(batches) == 11 and len(batches[-1]) == 3
    assert sorted(itertools.chain(*batches)) == list(range(103))
    assert list(itertools.chain(*batches)) != list(range(103))  # shuffled


def test_resident_epochs_are_reproducible_from_seed_and_differ():
    a, b, c = make_loader(seed=5), make_loader(seed=5), make_loader(seed=6)
    first, second = epoch_labels(a), epoch_labels(a)
    assert first == epoch_labels(b)  # same seed, same epoch 0
    assert second == epoch_labels(b)  # ... and same epoch 1
    assert first != second  # epochs differ
    assert first != epoch_labels(c)  # seeds differ
    a.set_epoch(0)
    assert epoch_labels(a) == first  # set_epoch replays an epoch
    a.set_epoch(1)
    assert epoch_labels(a) == second


def test_resident_augmentation_is_reproducible_from_seed():
    image = distinct_image(1, 8, 8)
    kwargs = {"max_shift": (1, 1), "pixel_max": 255, "drop_last": False}
    a = ResidentLoader(image.expand(64, 1, 8, 8), torch.arange(64), 16, seed=3, **kwargs)
    b = ResidentLoader(image.expand(64, 1, 8, 8), torch.arange(64), 16, seed=3, **kwargs)
    xa, xb = torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b])
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, torch.cat([x for x, _ in a]))  # next epoch differs


def test_resident_no_shuffle_keeps_order():
    loader = make_loader(n=25, batch_size=10, shuffle=False, drop_last=False)
    assert list(itertools.chain(*epoch_labels(loader))) == list(range(25))


@pytest.mark.parametrize("drop_last", [True, False])
def test_resident_ddp_shards_are_disjoint_and_equal_sized(drop_last):
    n, world = 103, 3
    shards = [
        list(
            itertools.chain(
                *epoch_labels(
                    make_loader(n, 8, drop_last=drop_last, rank=r, world_size=world, seed=1)
                )
            )
        )
        for r in range(world)
    ]
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1  # every rank the same number of samples (no DDP hang)
    batches = {
        len(make_loader(n, 8, drop_last=drop_last, rank=r, world_size=world)) for r in range(3)
    }
    assert len(batches) == 1
    everything = list(itertools.chain(*shards))
    if drop_last:
        assert lengths == {(n // world) // 8 * 8}  # full batches only
        assert len(set(everything)) == len(everything)  # disjoint
    else:
        assert lengths == {-(-n // world)} and set(everything) == set(range(n))  # covers all
        assert len(everything) - len(set(everything)) == world * (-(-n // world)) - n  # padding


def test_resident_ddp_shards_partition_the_single_rank_epoch():
    whole = list(itertools.chain(*epoch_labels(make_loader(99, 11, drop_last=True, seed=2))))
    parts = [
        list(
            itertools.chain(
                *epoch_labels(make_loader(99, 11, drop_last=True, seed=2, rank=r, world_size=3))
            )
        )
        for r in range(3)
    ]
    assert list(itertools.chain(*parts)) == whole  # each rank takes its slice of one permutation


def test_resident_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        make_loader(rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(batch_size=0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_loader(n=10, batch_size=8, world_size=2, drop_last=True)
    with pytest.raises(ValueError, match="2D images"):
        ResidentLoader(torch.zeros(4, 1, 8), torch.zeros(4), 2, max_shift=(1, 1))


def test_resident_loader_under_lightning_gets_set_epoch(monkeypatch):
    """Lightning's per-epoch sampler.set_epoch hook reaches the resident loader; epochs differ."""
    import lightning.pytorch as pl

    from moe_lab.data import DigitsDataModule

    calls: list[int] = []
    original = ResidentLoader.set_epoch

    def spy(self, epoch):
        if self.shuffle:  # the training loader (val/test loaders get the call too)
            calls.append(epoch)
        original(self, epoch)

    monkeypatch.setattr(ResidentLoader, "set_epoch", spy)

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 10)
            self.seen: dict[int, list[int]] = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
            self.seen.setdefault(self.current_epoch, []).extend(y.tolist())
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            x, _ = batch
            self.val_batches = getattr(self, "val_batches", 0) + 1
            assert x.shape[1:] == (1, 8, 8)

        def test_step(self, batch, batch_idx):
            self.test_samples = getattr(self, "test_samples", 0) + len(batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        datamodule = DigitsDataModule(tmp, loader="resident", batch_size=32)
        model = Recorder()
        trainer = pl.Trainer(
            max_epochs=2,
            limit_train_batches=4,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        trainer.fit(model, datamodule=datamodule)
        trainer.test(model, datamodule=datamodule, verbose=False)
    assert calls == [0, 1]
    assert model.seen[0] != model.seen[1]
    assert model.val_batches == 2  # one per epoch, through Lightning's val loop
    assert model.test_samples == 360


def test_auto_loader_is_torch_on_a_cpu_trainer_and_resident_on_cuda():
    import lightning.pytorch as pl

    from moe_lab.data import DigitsDataModule

    datamodule = DigitsDataModule("unused", loader="auto")
    datamodule.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    assert datamodule.device.type == "cpu" and datamodule.resolved_loader() == "torch"
    datamodule.to_device("cuda")  # only resolves; no data is moved until a loader is built
    assert datamodule.resolved_loader() == "resident"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resident_path_on_cuda_matches_the_distribution():
    max_shift = (2, 3)
    image = distinct_image(1, 12, 20)
    reference = image.numpy().astype(np.int64)
    n = 3500
    cuda_draws = to_pixels(draws_resident_path(image, n, max_shift, "cuda"))
    cuda = recover_params(cuda_draws, reference, max_shift)
    cpu = recover_params(to_pixels(draws_torch_path(image, n, max_shift)), reference, max_shift)
    check_same_distribution(cpu, cuda, max_shift)
