"""Cached-embedding linear probing: features of any frozen torchvision or timm backbone, cached in
one HDF5 file, and heads (linear, kNN, nearest class mean) trained on them in seconds.

Importing the package is cheap: names are loaded on first use, and torch only by the stages that
run a model. Safe loaders for files from others: `read_features` (a cache), `load_head` (a head
folder) and `load_export` (an exported classifier, refusing pickled content). `pipeline.rank`
scores features for labels without training (`pipeline.rank.logme(X, y)` and the rest).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {
    "FeatureSet": "pipeline.cache.reader",
    "Split": "pipeline.cache.reader",
    "read_features": "pipeline.cache.reader",
    "load_head": "pipeline.heads.saved",
    "load_export": "pipeline.exportfile",
}
_MODULES = ("rank",)
__all__ = ["__version__", *_LAZY, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"pipeline.{name}")
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
