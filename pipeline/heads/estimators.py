"""What the head kinds and their scikit-learn estimators share.

- `Preprocessor`: standardise or L2-normalise rows; fitted on the training rows only.
- `log_proba_from_decision`: float64 log-probabilities from logits.
- `balanced_weights`: per-row class weights, as scikit-learn computes them.
- `LinearDecision`, `CosineHead`: the estimator bases of the linear and the cosine heads.

The estimators themselves live with their kind (`pipeline.heads.kinds`).
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import ConfigError
from pipeline.registry import COSINE_PREPROCESSING, PREPROCESSING


def log_proba_from_decision(decision: np.ndarray) -> np.ndarray:
    """(n, C) float64 log-probabilities from (n, C) logits, or (n,) binomial logits of the second
    class.

    A log-softmax in float64: a confident mistake keeps its true loss (p = 1e-12 is log p = -27.6),
    where float32 probabilities underflow to 0 past a logit gap of about 100.
    """
    z = np.asarray(decision, dtype=np.float64)
    if z.ndim == 1:  # binomial: log sigmoid(-z), log sigmoid(z), without overflow
        return -np.logaddexp(0.0, np.column_stack([z, -z]))
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def proba_from_decision(decision: np.ndarray) -> np.ndarray:
    """float64 probabilities (rows sum to 1), from the float64 log-softmax."""
    return np.exp(log_proba_from_decision(decision))


class Preprocessor:
    """`standardize` (mean/std of the rows it is fitted on), `l2` (unit rows), `center-l2` (minus
    the mean of the rows it is fitted on, then unit rows) or `none`."""

    def __init__(self, kind: str = "standardize") -> None:
        if kind not in PREPROCESSING:
            raise ConfigError(
                f"unknown preprocessing {kind!r}; choose one of: {', '.join(PREPROCESSING)}"
            )
        self.kind = kind
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, X: np.ndarray) -> Preprocessor:
        if self.kind == "standardize":
            self.mean_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
            std = X.std(axis=0, dtype=np.float64)
            self.scale_ = np.where(std > 1e-12, std, 1.0).astype(
                np.float32
            )  # constant columns stay put
        elif self.kind == "center-l2":
            self.mean_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.kind == "standardize":
            return (X - self.mean_) / self.scale_
        if self.kind == "center-l2":
            X = X - self.mean_
        if self.kind in ("l2", "center-l2"):
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            return X / np.where(norms > 0, norms, 1.0)
        return X

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)


def balanced_weights(
    y: np.ndarray, class_weight: Any, sample_weight: np.ndarray | None = None
) -> np.ndarray | None:
    """Per-row class weights from `class_weight` (None, 'balanced' or {class: weight}), as
    scikit-learn does.

    'balanced' is sum(w) / (classes * sum of w over class c), the class counts weighed by
    `sample_weight` (as scikit-learn 1.9's `LogisticRegression` does; earlier releases counted
    rows). The sample weights themselves are not included: the caller multiplies them in."""
    if class_weight is None or class_weight == "none":
        return None
    classes, codes = np.unique(y, return_inverse=True)
    if class_weight == "balanced":
        w = (
            np.ones(len(y))
            if sample_weight is None
            else np.asarray(sample_weight, dtype=np.float64)
        )
        counts = np.bincount(codes, weights=w, minlength=len(classes))
        with np.errstate(
            divide="ignore"
        ):  # a class whose rows all weigh 0 contributes nothing anyway
            per_class = np.where(counts > 0, counts.sum() / (len(classes) * counts), 0.0)
    else:
        per_class = compute_class_weight(class_weight, classes=classes, y=y)
    return per_class[codes]


class LinearDecision:
    """Probabilities and classes from `decision_function` (logits, or one binomial logit) and
    `classes_`: what every linear head here shares."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return proba_from_decision(self.decision_function(X))

    def predict_log_proba(self, X: np.ndarray) -> np.ndarray:
        return log_proba_from_decision(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        decision = self.decision_function(X)
        index = (decision > 0).astype(int) if decision.ndim == 1 else decision.argmax(axis=1)
        return self.classes_[index]


def is_real(value: Any) -> bool:
    """A real number (numpy scalars too), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


class CosineHead(ClassifierMixin, BaseEstimator):
    """What the cosine estimators share: the preprocessing (`l2` or `center-l2`, fitted on the
    training rows) and their checks."""

    def _prepare(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.preprocess not in COSINE_PREPROCESSING:
            raise ValueError(
                f"The 'preprocess' parameter of {type(self).__name__} must be one of "
                f"{COSINE_PREPROCESSING}. "
                f"Got {self.preprocess!r} instead."
            )
        if not (is_real(self.temperature) and 0 < self.temperature < np.inf):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        self.preprocessor_ = Preprocessor(self.preprocess).fit(X)
        return self.preprocessor_.transform(X).astype(X.dtype, copy=False), codes

    def _transform(self, X: Any) -> np.ndarray:
        """Preprocessed rows, in the dtype of X: float64 input is compared in float64
        (batch-invariant)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return self.preprocessor_.transform(X).astype(X.dtype, copy=False)

    def predict_proba(self, X: Any) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))
