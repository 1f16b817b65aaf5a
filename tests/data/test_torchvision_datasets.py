"""Every named torchvision dataset, loaded by torchvision itself from files in its on-disk
format."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision.datasets as tvd

from pipeline import read_features
from pipeline.data.sources import load_samples
from pipeline.errors import ConfigError, MissingError
from pipeline.features import stage
from pipeline.registry import TORCHVISION_DATASETS as TORCHVISION_SPLITS

from helpers import tiny
from helpers.tvformats import WRITERS

CARVE = {"val_fraction": 0.34, "test_fraction": 0.34, "split_seed": 0}


def _torchvision_view(name, root):
    """(image bytes, label) of every image as torchvision's own __getitem__ returns it."""
    cls = getattr(tvd, name)
    seen = []
    for kwargs in TORCHVISION_SPLITS[name].values():
        ds = cls(str(root), **kwargs)
        for j in range(len(ds)):
            image, label = ds[j]
            seen.append((np.asarray(image.convert("RGB")).tobytes(), int(label)))
    return seen


def test_every_named_dataset_has_a_writer():
    assert set(WRITERS) == set(TORCHVISION_SPLITS)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_loads_with_official_splits(name, tmp_path, monkeypatch):
    written = WRITERS[name](tmp_path, monkeypatch)
    samples = load_samples(dataset=name.lower(), root=str(tmp_path), **CARVE)

    assert len(samples) == sum(written.values())
    assert len(samples.classes) == (
        102 if name == "Flowers102" else 3
    )  # Flowers102 names all its classes
    sizes = samples.split_sizes()
    for split in ("val", "test"):
        if split in written:  # official splits are kept whole ...
            assert sizes[split] == written[split] and split not in samples.carved
        else:  # ... missing ones are carved from train, stratified
            assert sizes[split] > 0 and samples.carved[split]["from"] == "train"
    assert (
        sizes["train"] + sum(sizes[s] for s in ("val", "test") if s not in written)
        == written["train"]
    )

    # Each row's pixels and label are exactly what torchvision's own loader gives for that image.
    theirs = _torchvision_view(name, tmp_path)
    ours = [
        (np.asarray(samples.read(r)).tobytes(), int(samples.labels[r])) for r in range(len(samples))
    ]
    assert sorted(ours) == sorted(theirs)


@pytest.mark.slow
def test_cifar10_through_the_cache(tmp_path, monkeypatch):
    WRITERS["CIFAR10"](tmp_path, monkeypatch)
    cfg = tiny(
        dataset="CIFAR10", root=str(tmp_path), out=str(tmp_path / "c10.h5"), val_fraction=0.25
    )
    stage.run(cfg)
    fs = read_features(cfg.out)
    assert fs.classes == ["alpha", "beta", "gamma"]
    assert {k: len(v) for k, v in fs.splits.items()} == {"train": 15, "val": 5, "test": 4}
    assert fs["test"].ids.tolist() == ["test/0", "test/1", "test/2", "test/3"]


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(
        MissingError,
        match=r"CIFAR10 not found under .*; pass --download \(download = true in a config or "
        r"study file\) to fetch it",
    ):
        load_samples(dataset="CIFAR10", root=str(tmp_path))
    with pytest.raises(
        MissingError, match=r"ImageNet not found under .*; place the official files there"
    ):
        load_samples(dataset="ImageNet", root=str(tmp_path))


def test_imagenet_cannot_be_downloaded(tmp_path):
    with pytest.raises(
        ConfigError, match=r"torchvision cannot download ImageNet; get it from its official site"
    ):
        load_samples(dataset="imagenet", root=str(tmp_path), download=True)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(
        ConfigError, match=r"unknown dataset 'MNISTX'; choose one of: digits, CIFAR10, CIFAR100"
    ):
        load_samples(dataset="MNISTX")
