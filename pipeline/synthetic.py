"""Synthetic data for tests, benchmarks and notebooks, made the way real data is, through the real
writers.

- Image folders: `write_image` (a small noisy image of one colour), `make_folder`
  (ROOT/<class>/<n>.png, with split folders when asked), `photo_like` and `write_photo_folder`
  (JPEGs that decode like camera photos: gradients, soft blobs, sensor noise).
- Caches: `write_cache` (a complete cache from arrays, through `CacheWriter`) and
  `write_synthetic_cache` (one shaped like CIFAR-100 under a ResNet-50, written in blocks).

Every generator is seeded: the same call writes the same files.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cache import writer as cache_writer

PALETTE = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40), (160, 40, 200)]


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (28, 22)) -> Path:
    """A small noisy image of one dominant colour (the seed comes from the file name:
    reproducible)."""
    rng = np.random.default_rng(zlib.crc32(str(path.name).encode()))
    pixels = np.clip(np.array(color) + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(
        np.uint8
    )
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
                write_image(
                    root / s / name / f"{s or 'img'}{n:02d}{ext}", PALETTE[c % len(PALETTE)], size
                )
    return root


def write_cache(
    path: Path,
    X: np.ndarray,
    y: np.ndarray,
    split: np.ndarray,
    classes: list[str] | None = None,
    fingerprint: dict | None = None,
) -> Path:
    """A complete cache file from arrays (sorted by split here), written by the real writer."""
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


def write_synthetic_cache(
    path: str | Path,
    n_train: int = 50_000,
    n_test: int = 10_000,
    dim: int = 2048,
    classes: int = 100,
    latent: int = 128,
    sep: float = 0.3,
    seed: int = 0,
) -> Path:
    """A cache shaped like CIFAR-100 under a ResNet-50 by default: class structure from a
    low-dimensional latent space plus noise, ReLU'd like pooled features, so a linear head lands
    well above chance and well below 100%; float16, written in blocks of 10,000 rows."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, latent)).astype(np.float32)
    mixing = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
    n = n_train + n_test
    split = np.repeat(np.array([0, 2], dtype=np.int8), [n_train, n_test])
    labels = rng.integers(0, classes, n)  # drawn up front so rows can be written in blocks
    fingerprint = {
        "backbone": "synthetic",
        "rows": n,
        "dim": dim,
        "classes": classes,
        "sep": sep,
        "seed": seed,
    }
    writer = cache_writer.CacheWriter.open(
        path,
        fingerprint=fingerprint,
        ids=[f"{i}" for i in range(n)],
        labels=labels,
        split=split,
        classes=[f"class_{c:03d}" for c in range(classes)],
        dim=dim,
        store_dtype="float16",
    )
    for start in range(0, n, 10_000):
        y = labels[start : start + 10_000]
        latent_rows = centers[y] * sep + rng.normal(size=(len(y), latent)).astype(np.float32)
        X = latent_rows @ mixing + 0.7 * rng.normal(size=(len(y), dim)).astype(np.float32)
        writer.write(start, np.maximum(X, 0).astype(np.float16))
    return writer.finish()


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    if (
        width * height > 1_000_000
    ):  # large photos: the scene at a quarter, upscaled, then full-size noise
        scene = photo_like(rng, width // 4, height // 4).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        pixels = np.asarray(scene, dtype=np.int16) + rng.integers(
            -6, 7, (height, width, 3), dtype=np.int16
        )
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):  # a smooth background per channel
        (a, b), base = rng.uniform(-0.4, 0.4, 2), rng.uniform(60, 190)
        image[..., c] = base + a * (xx - width / 2) + b * (yy - height / 2)
    for _ in range(rng.integers(4, 9)):  # soft coloured blobs ("objects")
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        image += blob * rng.uniform(-90, 90, 3)
    image += rng.normal(0, 6, image.shape)  # sensor noise
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_photo_folder(
    root: str | Path, n: int, classes: int = 10, seed: int = 0, size: tuple[int, int] = (500, 375)
) -> Path:
    """``ROOT/class_k/img_nnnnn.jpg``, n images of `size` in all, quality 90; kept when already
    there."""
    root = Path(root)
    done = root / f".complete-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        photo_like(rng, *size).save(folder / f"img_{i:05d}.jpg", quality=90)
    done.touch()
    return root
