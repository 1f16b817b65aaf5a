"""The one trained-head type (`TrainedHead`): what the protocol's final fit becomes, whatever its
kind.

A trained head is its kind, the preprocessing fitted on its training rows, the class names, the
kind's arrays (weights, or a bank of rows) and the kind's settings (k, temperatures). It predicts
with numpy alone, and `to_module()` gives the same computation as a torch module for `export`. Its
files are written and read by `pipeline.heads.saved`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.heads.estimators import Preprocessor


class TrainedHead:
    """A trained head of any kind: `predict`, `predict_proba`, `predict_log_proba` on raw features,
    `classes_`, `n_features_in_`, `meta` (what head.json says), and `to_module()` for export."""

    def __init__(
        self,
        # its `pipeline.heads.kinds.HeadKind` (not imported: the kinds import this module)
        kind: Any,
        preprocessor: Preprocessor,
        classes: np.ndarray,
        arrays: dict[str, np.ndarray],
        settings: dict[str, Any] | None = None,
        n_features: int | None = None,
    ) -> None:
        self.kind = kind
        self.preprocessor = preprocessor
        self.classes_ = np.asarray(classes)
        self.arrays = arrays
        self.settings = dict(settings or {})
        self.n_features_in_ = int(n_features if n_features is not None else kind.n_features(arrays))
        self.meta: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"TrainedHead({self.kind.name}, {len(self.classes_)} classes, {self.n_features_in_}-d)"
        )

    def _rows(self, X: np.ndarray) -> np.ndarray:
        Z = self.preprocessor.transform(X)
        if Z.ndim != 2 or Z.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {Z.shape[-1]} features, but this head expects {self.n_features_in_}"
            )
        return Z

    def predict_log_proba(self, X: np.ndarray) -> np.ndarray:
        """float64 log-probabilities (n, classes)."""
        return self.kind.log_proba(self, self._rows(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_log_proba(X).argmax(axis=1)]

    def to_module(self) -> Any:
        """A `torch.nn.Module`: raw features (B, D) -> class probabilities (B, classes), the
        preprocessing inside, so `export` can put it after any backbone."""
        import torch
        from torch import nn

        prep, dim = self.preprocessor, self.n_features_in_

        class Preprocess(nn.Module):
            """The head's preprocessing, fitted on its training rows, in torch."""

            def __init__(self) -> None:
                super().__init__()
                self.kind = prep.kind
                mean = prep.mean_ if prep.mean_ is not None else np.zeros(dim, np.float32)
                scale = prep.scale_ if prep.scale_ is not None else np.ones(dim, np.float32)
                for name, array in (
                    ("mean", mean),
                    ("scale", scale),
                ):  # own copies: export saves them whole
                    self.register_buffer(
                        name, torch.tensor(np.ascontiguousarray(array, dtype=np.float32))
                    )

            def forward(self, f: torch.Tensor) -> torch.Tensor:
                if self.kind == "standardize":
                    return (f - self.mean) / self.scale
                if self.kind in ("l2", "center-l2"):
                    f = f - self.mean if self.kind == "center-l2" else f
                    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
                return f

        return nn.Sequential(Preprocess(), self.kind.module(self)).eval()


def preprocessor_arrays(prep: Preprocessor) -> dict[str, np.ndarray]:
    """The fitted statistics of a preprocessing, as head.npz stores them."""
    return {
        "standardize": {"mean": prep.mean_, "scale": prep.scale_},
        "center-l2": {"mean": prep.mean_},
    }.get(prep.kind, {})


def is_number(value: Any, integer: bool = False) -> bool:
    """A JSON number (not a bool), a whole one when `integer`: how head.json settings are
    checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return False
    return math.isfinite(number) and (not integer or number.is_integer())
