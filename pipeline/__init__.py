"""Cached-embedding linear probing: frozen torchvision ResNet features in HDF5, fast linear heads.

Importing the package is cheap: torch is imported only by the stages that run a model.
"""

from pipeline.store import FeatureSet, Split, read_features

__version__ = "0.1.0"
__all__ = ["FeatureSet", "Split", "__version__", "read_features"]
