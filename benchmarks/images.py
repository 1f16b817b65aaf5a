"""Photo-like JPEGs for extraction benchmarks: smooth gradients, soft blobs and sensor noise, so
files decode like camera photos (tens of KB at quality 90), not like pure noise or flat colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    if width * height > 1_000_000:  # large photos: the scene at a quarter, upscaled, then full-size noise
        scene = photo_like(rng, width // 4, height // 4).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(scene, dtype=np.int16) + rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
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
    """``ROOT/class_k/img_nnnnn.jpg``, n images of `size` in all, quality 90; kept when already there."""
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
