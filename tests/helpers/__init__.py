"""What the tests share, imported as `from helpers import ...` (pytest puts tests/ on the path
through its conftest): the repository root, a fast resnet18 feature config, slowed cache writes for
signal tests, and the synthetic data generators of `pipeline.synthetic`. The fault tests' own
helpers are `helpers.faults`; torchvision's on-disk formats are `helpers.tvformats`."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import FeaturesConfig
from pipeline.synthetic import PALETTE, make_folder, write_cache, write_image

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "PALETTE",
    "REPO",
    "SLOW_WRITES",
    "classification",
    "make_folder",
    "tiny",
    "write_cache",
    "write_image",
]

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


def tiny(**overrides) -> FeaturesConfig:
    """resnet18 with random weights at 32 px in this process: a feature run in about a second (fp32:
    the same numbers on every CPU)."""
    settings = dict(
        backbone="resnet18",
        weights="none",
        precision="fp32",
        image_size=32,
        batch_size=4,
        workers=0,
        progress=False,
        val_fraction=0.25,
    )
    settings.update(overrides)
    return FeaturesConfig(**settings)


def classification(
    n_classes: int = 5, n: int = 800, weights: list[float] | None = None, seed: int = 0
):
    """(X, y): a standardised `make_classification` problem of 30 features, 12 informative."""
    from sklearn.datasets import make_classification
    from sklearn.preprocessing import StandardScaler

    X, y = make_classification(
        n,
        30,
        n_informative=12,
        n_classes=n_classes,
        weights=weights,
        class_sep=0.8,
        random_state=seed,
    )
    return StandardScaler().fit_transform(X), y
