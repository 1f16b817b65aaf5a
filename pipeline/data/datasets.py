"""Datasets by name: the standard torchvision classification sets in their own on-disk formats
(downloaded with --download), and the offline digits demo written as an image folder."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import fsutil
from pipeline.data.images import ArrayReader, load_image
from pipeline.data.samples import SampleList, finalize
from pipeline.errors import ConfigError, DataError, MissingError
from pipeline.registry import TORCHVISION_DATASETS
from pipeline.splits import stratified_holdout


def _dataset_items(
    ds: Any, split_key: str, root: Path
) -> tuple[list[str], list[Any], list[int], bool]:
    """(ids, items, labels, in_memory) of one constructed torchvision dataset."""
    if isinstance(getattr(ds, "data", None), np.ndarray):  # CIFAR (N, H, W, C), STL10 (N, C, H, W)
        labels = getattr(ds, "targets", None)
        labels = ds.labels if labels is None else labels
        n = len(ds.data)
        return (
            [f"{split_key}/{i}" for i in range(n)],
            [(split_key, i) for i in range(n)],
            list(map(int, labels)),
            True,
        )
    if hasattr(ds, "samples"):  # ImageFolder-based: ImageNet
        paths, labels = zip(*ds.samples, strict=True) if ds.samples else ((), ())
    elif hasattr(ds, "_image_files"):  # Flowers102, DTD, Food101, FGVCAircraft, SUN397
        paths, labels = ds._image_files, ds._labels
    elif hasattr(ds, "_images"):  # OxfordIIITPet
        paths, labels = ds._images, ds._labels
    elif hasattr(ds, "categories") and hasattr(ds, "y"):  # Caltech101
        folder = Path(ds.root) / "101_ObjectCategories"
        paths = [
            folder / ds.categories[y] / f"image_{i:04d}.jpg"
            for y, i in zip(ds.y, ds.index, strict=True)
        ]
        labels = ds.y
    else:
        raise DataError(
            f"torchvision dataset {type(ds).__name__} exposes no image list this version can read"
        )
    paths = [str(p) for p in paths]
    return [os.path.relpath(p, root) for p in paths], paths, list(map(int, labels)), False


def _dataset_classes(ds: Any, n_labels: int) -> list[str]:
    if hasattr(ds, "wnids"):  # ImageNet: several wnids share a first name; keep them apart
        return [f"{names[0]} ({wnid})" for wnid, names in zip(ds.wnids, ds.classes, strict=True)]
    names = getattr(ds, "classes", None) or getattr(ds, "categories", None)
    return [str(c) for c in names] if names else [f"class_{i:03d}" for i in range(n_labels)]


def load_torchvision(
    name: str,
    root: str | Path,
    download: bool,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    verify_content: bool = False,
    rule: str = "stratified",
) -> SampleList:
    """A torchvision dataset with its official splits (labels read without decoding any image)."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    root = Path(root).expanduser()
    accepts_download = "download" in inspect.signature(cls).parameters
    if download and not accepts_download:
        raise ConfigError(
            f"torchvision cannot download {name}; get it from its official site and pass --root to "
            "the local copy"
        )
    ids, items, labels, splits, arrays = [], [], [], [], {}
    classes: list[str] = []
    for split, kwargs in TORCHVISION_DATASETS[name].items():
        extra = {"download": download} if accepts_download else {}
        try:
            ds = cls(str(root), **kwargs, **extra)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            if not accepts_download:
                fix = "place the official files there"
            elif download:
                fix = "the download failed: check the network, or fetch it where there is one"
            else:
                fix = "pass --download (download = true in a config or study file) to fetch it"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MissingError(
                f"{name} not found under {root} ({reason}); {fix}, or point --root at a copy"
            ) from None
        s_ids, s_items, s_labels, in_memory = _dataset_items(ds, split, root)
        if in_memory:
            arrays[split] = ds.data
        ids += s_ids
        items += s_items
        labels += s_labels
        splits += [split] * len(s_ids)
        classes = classes or _dataset_classes(ds, max(s_labels, default=-1) + 1)
    reader = ArrayReader(arrays, channels_first=name == "STL10") if arrays else load_image
    source = f"{name} in {root}"
    return finalize(
        ids,
        items,
        labels,
        splits,
        classes,
        source,
        val_fraction,
        test_fraction,
        seed,
        reader,
        verify_content,
        rule,
    )


def materialize_digits(root: str | Path) -> Path:
    """scikit-learn's bundled 8x8 digits as ``ROOT/digits/{train,test}/<digit>/<n>.png`` (written
    once)."""
    target = Path(root).expanduser() / "digits"
    if (target / "train").is_dir():
        return target
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    test = stratified_holdout(digits.target, 0.25, seed=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    fsutil.private_to_shared(staging, directory=True)
    for n, (image, label, is_test) in enumerate(zip(pixels, digits.target, test, strict=True)):
        folder = staging / ("test" if is_test else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{n:04d}.png")
    try:
        staging.rename(target)  # appears whole, or not at all
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target
