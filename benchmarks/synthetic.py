"""The sweep matrix's caches, from `pipeline.synthetic` (`python -m benchmarks.synthetic [OUT]`
writes the CIFAR-100-shaped one: 50,000 train + 10,000 test rows, 2,048-d, float16, 100 classes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.synthetic import write_synthetic_cache

__all__ = ["matrix_cache", "write_synthetic_cache"]


def matrix_cache(out: Path, n: int, d: int, k: int) -> Path:
    """The sweep matrix's cache of N train rows (+ N/5 test), D dimensions and K classes, written
    once."""
    cache = Path(out) / f"matrix-{n}-{d}-{k}.h5"
    if not cache.exists():
        write_synthetic_cache(
            cache, n_train=n, n_test=n // 5, dim=d, classes=k, latent=min(128, d // 4)
        )
    return cache


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="benchmarks/out/cifar100-like.h5")
    args = parser.parse_args()
    print(write_synthetic_cache(args.out))
