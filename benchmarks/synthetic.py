"""A feature cache shaped like CIFAR-100 under a ResNet-50: 50,000 train + 10,000 test rows,
2,048-d, float16, 100 classes; class structure from a low-dimensional latent space plus noise,
ReLU'd like pooled features, so a linear head lands well above chance and well below 100%."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.cache import writer as cache_writer


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
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, latent)).astype(np.float32)
    mixing = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
    n = n_train + n_test
    split = np.repeat(np.array([0, 2], dtype=np.int8), [n_train, n_test])
    labels = rng.integers(0, classes, n)  # drawn up front so rows can be written in blocks
    fingerprint = {"backbone": "synthetic", "rows": n, "dim": dim, "classes": classes, "sep": sep, "seed": seed}
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


def matrix_cache(out: Path, n: int, d: int, k: int) -> Path:
    """The sweep matrix's cache of N train rows (+ N/5 test), D dimensions and K classes, written once."""
    cache = Path(out) / f"matrix-{n}-{d}-{k}.h5"
    if not cache.exists():
        write_synthetic_cache(cache, n_train=n, n_test=n // 5, dim=d, classes=k, latent=min(128, d // 4))
    return cache


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="benchmarks/out/cifar100-like.h5")
    args = parser.parse_args()
    print(write_synthetic_cache(args.out))
