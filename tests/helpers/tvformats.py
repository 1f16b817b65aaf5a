"""Tiny datasets written in torchvision's own on-disk formats, so the real torchvision loaders run.

Each writer returns {split: number of images} for what it wrote. Writers whose torchvision class
checks md5 sums patch those sums to the files written here (the check itself still runs).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets as tvd
from PIL import Image

CLASSES = ("alpha", "beta", "gamma")


def _pixels(seed: int, shape=(20, 24, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed)).save(path, quality=95)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def cifar(root: Path, mp: pytest.MonkeyPatch, cls=tvd.CIFAR10) -> dict[str, int]:
    hundred = cls is tvd.CIFAR100
    folder = root / cls.base_folder
    label_key = "fine_labels" if hundred else "labels"
    sums = {}
    for i, (name, _) in enumerate(cls.train_list + cls.test_list):
        n = 4
        data = np.stack(
            [_pixels(100 * i + k, (3, 32, 32)).reshape(-1) for k in range(n)]
        )  # (n, 3072)
        _pickle(folder / name, {"data": data, label_key: [k % 3 for k in range(n)]})
        sums[name] = _md5(folder / name)
    _pickle(folder / cls.meta["filename"], {cls.meta["key"]: list(CLASSES)})
    mp.setattr(cls, "train_list", [[n, sums[n]] for n, _ in cls.train_list])
    mp.setattr(cls, "test_list", [[n, sums[n]] for n, _ in cls.test_list])
    mp.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    return {"train": 4 * len(cls.train_list), "test": 4}


def cifar100(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    return cifar(root, mp, tvd.CIFAR100)


def stl10(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    folder = root / tvd.STL10.base_folder
    folder.mkdir(parents=True)
    for split, n in (("train", 6), ("test", 3), ("unlabeled", 1)):
        np.stack([_pixels(7 * k + n, (3, 96, 96)) for k in range(n)]).tofile(
            folder / f"{split}_X.bin"
        )
        if split != "unlabeled":
            (np.arange(n, dtype=np.uint8) % 3 + 1).tofile(
                folder / f"{split}_y.bin"
            )  # 1-based on disk
    (folder / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    mp.setattr(tvd.STL10, "train_list", [[n, _md5(folder / n)] for n, _ in tvd.STL10.train_list])
    mp.setattr(tvd.STL10, "test_list", [[n, _md5(folder / n)] for n, _ in tvd.STL10.test_list])
    return {"train": 6, "test": 3}


def flowers102(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    base = root / "flowers-102"
    for image_id in range(1, 10):
        _jpeg(base / "jpg" / f"image_{image_id:05d}.jpg", image_id)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([1, 2, 3] * 3)})
    scipy.io.savemat(
        base / "setid.mat", {"trnid": [1, 2, 3, 4], "valid": [5, 6, 7], "tstid": [8, 9]}
    )
    files = tvd.Flowers102._file_dict
    mp.setattr(
        tvd.Flowers102,
        "_file_dict",
        {
            **files,
            "label": ("imagelabels.mat", _md5(base / "imagelabels.mat")),
            "setid": ("setid.mat", _md5(base / "setid.mat")),
        },
    )
    return {"train": 4, "val": 3, "test": 2}


def oxford_pet(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    base = root / "oxford-iiit-pet"
    breeds = ("Abyssinian", "beagle", "Bengal")
    lines = {"trainval": [], "test": []}
    for k in range(9):
        name = f"{breeds[k % 3]}_{k}"
        _jpeg(base / "images" / f"{name}.jpg", k)
        lines["trainval" if k < 6 else "test"].append(f"{name} {k % 3 + 1} 1 1")
    for split, rows in lines.items():
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return {"train": 6, "test": 3}


def dtd(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    data = root / "dtd" / "dtd"
    counts = {"train": 3, "val": 3, "test": 3}
    k = 0
    for split, n in counts.items():
        rows = []
        for i in range(n):
            rel = f"{CLASSES[i % 3]}/{CLASSES[i % 3]}_{k:04d}.jpg"
            _jpeg(data / "images" / rel, k)
            rows.append(rel)
            k += 1
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("\n".join(rows) + "\n")
    return counts


def food101(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    base = root / "food-101"
    k = 0
    for split, n in (("train", 2), ("test", 1)):
        meta = {}
        for c in CLASSES:
            meta[c] = []
            for _ in range(n):
                _jpeg(base / "images" / c / f"{k}.jpg", k)
                meta[c].append(f"{c}/{k}")
                k += 1
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return {"train": 6, "test": 3}


def fgvc_aircraft(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ("707-320", "A300B4", "Cessna 172")
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    k = 0
    for split, n in (("train", 3), ("val", 3), ("test", 3)):
        rows = []
        for i in range(n):
            _jpeg(data / "images" / f"{k:07d}.jpg", k)
            rows.append(f"{k:07d} {variants[i % 3]}")
            k += 1
        (data / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    return {"train": 3, "val": 3, "test": 3}


def caltech101(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    base = root / "caltech101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", *CLASSES):
        for i in range(1, 4):
            _jpeg(base / c / f"image_{i:04d}.jpg", hash((c, i)) % 1000)
    return {"train": 9}


def sun397(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    base = root / "SUN397"
    names = ("/a/abbey", "/b/beach", "/b/bedroom")
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(names) + "\n")
    for c, name in enumerate(names):
        for i in range(3):
            _jpeg(base / name.strip("/") / f"sun_{c}{i}.jpg", 10 * c + i)
    return {"train": 9}


def imagenet(root: Path, mp: pytest.MonkeyPatch) -> dict[str, int]:
    wnids = ("n01440764", "n01443537", "n01484850")
    names = (("tench", "Tinca tinca"), ("goldfish",), ("great white shark", "white shark"))
    torch.save((dict(zip(wnids, names, strict=True)), list(wnids)), root / "meta.bin")
    for split, n in (("train", 2), ("val", 1)):
        for w in wnids:
            for i in range(n):
                _jpeg(root / split / w / f"{w}_{split}_{i}.JPEG", hash((w, split, i)) % 1000)
    return {"train": 6, "test": 3}


WRITERS = {
    "CIFAR10": cifar,
    "CIFAR100": cifar100,
    "STL10": stl10,
    "Flowers102": flowers102,
    "OxfordIIITPet": oxford_pet,
    "DTD": dtd,
    "Food101": food101,
    "FGVCAircraft": fgvc_aircraft,
    "Caltech101": caltech101,
    "SUN397": sun397,
    "ImageNet": imagenet,
}
