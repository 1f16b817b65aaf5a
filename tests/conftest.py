"""Shared helpers: tiny image folders made in tmp_path, and a fast resnet18 feature config."""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import FeaturesConfig

REPO = Path(__file__).resolve().parents[1]
PALETTE = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40), (160, 40, 200)]


# Python source that slows every cache write by 0.3 s, so a signal or a kill lands mid-run; a test
# appends the entry it runs (`python -c SLOW_WRITES + ...`).
SLOW_WRITES = """
import sys, time
from pipeline.cache.writer import CacheWriter
write = CacheWriter.write
def slow(self, *a, **k):
    write(self, *a, **k)
    time.sleep(0.3)
CacheWriter.write = slow
"""


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (28, 22)) -> Path:
    """A small noisy image of one dominant colour (the seed comes from the path: reproducible)."""
    rng = np.random.default_rng(zlib.crc32(str(path.name).encode()))
    pixels = np.clip(np.array(color) + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 4,
    splits: tuple[str, ...] | None = None,
    ext: str = ".png",
    size: tuple[int, int] = (28, 22),
) -> Path:
    """ROOT/<class>/<n>.png, or ROOT/<split>/<class>/<n>.png when `splits` is given."""
    for s in splits or ("",):
        for c, name in enumerate(classes):
            for n in range(per_class):
                write_image(root / s / name / f"{s or 'img'}{n:02d}{ext}", PALETTE[c % len(PALETTE)], size)
    return root


def tiny(**overrides) -> FeaturesConfig:
    """resnet18 with random weights at 32 px in this process: a feature run in about a second."""
    settings = dict(
        backbone="resnet18", weights="none", image_size=32, batch_size=4, workers=0, progress=False, val_fraction=0.25
    )
    settings.update(overrides)
    return FeaturesConfig(**settings)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images", per_class=5)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub directory, and downloads that fail the way they do without a network."""
    import urllib.error

    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def write_cache(
    path: Path,
    X: np.ndarray,
    y: np.ndarray,
    split: np.ndarray,
    classes: list[str] | None = None,
    fingerprint: dict | None = None,
) -> Path:
    """A complete cache file from arrays (rows must be sorted by split), written by the real writer."""
    from pipeline.cache import writer as cache_writer

    order = np.argsort(split, kind="stable")
    X, y, split = X[order], y[order], split[order]
    classes = classes or [f"c{i}" for i in range(int(y.max()) + 1)]
    writer = cache_writer.CacheWriter.open(
        path,
        fingerprint=fingerprint or {"backbone": "synthetic", "rows": len(y)},
        ids=[f"row{i}" for i in range(len(y))],
        labels=y,
        split=split,
        classes=classes,
        dim=X.shape[1],
        store_dtype="float32",
    )
    writer.write(0, X.astype(np.float32))
    writer.finish()
    return path


@pytest.fixture
def synthetic_cache(tmp_path: Path) -> Path:
    """600 rows, 20-d, 4 classes: train 360 / val 120 / test 120."""
    from sklearn.datasets import make_classification

    X, y = make_classification(600, 20, n_informative=8, n_classes=4, class_sep=1.0, random_state=0)
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [360, 120, 120])
    return write_cache(tmp_path / "synthetic.h5", X, y, split)


@pytest.fixture
def tmpfs(tmp_path):
    """A 600 KiB tmpfs; skipped where this process may not mount."""
    point = tmp_path / "small"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(point)], capture_output=True)
    if done.returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def faults_cache(tmp_path_factory) -> Path:
    from pipeline.features import stage

    tmp = tmp_path_factory.mktemp("faults")
    root = make_folder(tmp / "img", classes=("cat", "dog", "owl"), per_class=8)
    out = tmp / "c.h5"
    stage.run(tiny(data=str(root), out=str(out), test_fraction=0.25))
    return out
