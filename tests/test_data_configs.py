"""conf/data/*.yaml: one per dataset (plus the shared ``_base``), Hydra-instantiable, and a topology
whose spatial sizes stay positive through every conv and pool (Keras valid/same lengths, computed
here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moe_lab.config import CONFIG_DIR
from moe_lab.data import DATASETS

CONF = CONFIG_DIR / "data"


def load_config(name: str, data_dir: Path):
    """The training config with ``data=name``, composed as ``moe_lab.train`` composes it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"data={name}", f"paths.data_dir={data_dir}", "seed=3"])


def test_one_config_per_dataset():
    presets = {path.stem for path in CONF.glob("*.yaml") if not path.name.startswith("_")}
    assert presets == set(DATASETS)


def test_presets_share_the_loader_keys_from_the_base(tmp_path):
    """The shared keys are written once, in _base.yaml, and reach every dataset."""
    base = OmegaConf.to_container(OmegaConf.load(CONF / "_base.yaml"))
    for name in DATASETS:
        data = OmegaConf.to_container(load_config(name, tmp_path).data)  # unresolved
        for key in base:
            if key != "augment":  # the image datasets turn on the original's shifts and flips
                assert data[key] == base[key], (name, key)
        own = OmegaConf.load(CONF / f"{name}.yaml")
        assert not set(own) & (set(base) - {"augment"}), f"{name}.yaml repeats a base key"
    cifar100 = OmegaConf.load(CONF / "cifar100.yaml")
    assert set(cifar100) == {"defaults", "_target_"}  # cifar10 with another datamodule
    c10, c100 = (
        OmegaConf.to_container(load_config(n, tmp_path).data) for n in ("cifar10", "cifar100")
    )
    assert {k for k in c10 if c10[k] != c100[k]} == {"_target_"}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_config_instantiates_the_datamodule(name, tmp_path):
    config = load_config(name, tmp_path)
    datamodule = instantiate(config.data)
    assert type(datamodule) is DATASETS[name] and datamodule.name == name
    assert datamodule.data_dir == tmp_path and datamodule.seed == 3  # follows the run seed
    assert datamodule.download is False and datamodule.loader == "auto"
    assert isinstance(datamodule.topology, dict)  # plain containers, not OmegaConf
    assert isinstance(datamodule.topology["blocks"], list)
    assert datamodule.topology == OmegaConf.to_container(config.data.topology)


def keras_length(n: int, kernel: int, padding: str) -> int:
    """Keras conv output length, stride 1, dilation 1."""
    if padding == "same":
        return n
    if padding == "valid":
        return n - kernel + 1
    raise AssertionError(f"unexpected padding {padding!r}")


def trace(topology: dict, spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    sizes = [spatial]
    for block in topology["blocks"]:
        assert len(block["padding"]) == len(block["channels"])
        for padding in block["padding"]:
            sizes.append(tuple(keras_length(n, block["kernel_size"], padding) for n in sizes[-1]))
        pool = block.get("pool")
        if pool:
            assert all(n >= pool for n in sizes[-1]), f"pool {pool} on {sizes[-1]}"
            sizes.append(tuple(n // pool for n in sizes[-1]))  # Keras MaxPool, valid
    return sizes


EXPECTED_FINAL = {  # spatial size at the flatten, worked out by hand (see the config comments)
    "cifar10": (6, 6),
    "cifar100": (6, 6),
    "mnist": (5, 5),
    "fashion_mnist": (5, 5),
    "mnist1d": (7,),
    "digits": (2, 2),
    "moving_digits": (2, 4, 4),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_topology_sizes_stay_positive(name, tmp_path):
    datamodule = instantiate(load_config(name, tmp_path).data)
    sizes = trace(datamodule.topology, datamodule.input_shape[1:])
    assert all(n >= 1 for size in sizes for n in size), sizes
    assert sizes[-1] == EXPECTED_FINAL[name]
    assert datamodule.topology["dense_units"] >= 1 and 0 <= datamodule.topology["dense_dropout"] < 1


def test_cifar10_topology_is_the_original_cnn(tmp_path):
    """With the original's layers (Keras Conv/Dense params), the topology gives the original CNN's
    1,250,858 parameters."""
    topology = instantiate(load_config("cifar10", tmp_path).data).topology
    channels, params = 3, 0
    for block in topology["blocks"]:
        for out in block["channels"]:
            params += channels * out * block["kernel_size"] ** 2 + out
            channels = out
    flat = channels * math.prod(EXPECTED_FINAL["cifar10"])
    params += flat * topology["dense_units"] + topology["dense_units"]
    params += topology["dense_units"] * 10 + 10
    assert params == 1_250_858
