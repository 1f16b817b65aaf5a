"""The non-parametric heads, on L2-normalised features (cosine similarity), with the estimator contract:

- `NearestClassMean` (`--head ncm`): the nearest class mean (prototype) classifier, the few-shot
  baseline. Its logits cos(x, m_c) / T are linear in the normalised x, so in the protocol it is a
  linear `Fit` and saves, predicts and exports like the linear heads.
- `CosineKNN` (`--head knn`): the k most similar rows of a bank (train; train+val after the
  refit) vote with weights exp(s / T), DINO's weighted kNN. One neighbour search, in blocks of
  queries within a memory budget, serves every k of the grid (`log_proba_grid`).

Votes become probabilities as p = (1 - e) v / sum(v) + e / K with e = 1 / (k + 1): as if one more
neighbour of unknown class had voted uniformly, so a class no neighbour voted for keeps a finite
log-loss. The argmax is the vote's.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.heads import posthoc
from pipeline.heads.estimators import Described, LinearDecision, Preprocessor
from pipeline.heads.runs import Fit
from pipeline.registry import COSINE_PREPROCESSING

DEFAULT_BUDGET = 256 * 2**20  # bytes of similarities per block of queries


def class_means(
    X: np.ndarray, y: np.ndarray, n_classes: int, temperature: float, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(D, O) weights and (O,) intercept of cos(x, m_c) / T for unit rows x: the unit (weighted) mean of
    each class over T; two classes as one logit (the difference), like the linear heads."""
    sums = np.zeros((n_classes, X.shape[1]))
    rows = X.astype(np.float64) if sample_weight is None else X.astype(np.float64) * sample_weight[:, None]
    np.add.at(sums, y, rows)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = sums / np.where(norms > 0, norms, 1.0)
    coef = means.T / temperature
    if n_classes == 2:
        coef = coef[:, 1:] - coef[:, :1]
    return coef.astype(np.float32), np.zeros(coef.shape[1], dtype=np.float32)


def fit_ncm(
    X: np.ndarray, y: np.ndarray, n_classes: int, temperature: float, sample_weight: np.ndarray | None = None
) -> Fit:
    """The protocol's NCM fit: closed form, nothing to converge ("exact"); its setting is T."""
    coef, intercept = class_means(X, y, n_classes, temperature, sample_weight)
    return Fit(temperature, coef, intercept, 0, True, exact=True, param="temperature")


def top_neighbours(
    Q: np.ndarray, bank: np.ndarray, k: int, budget: int = DEFAULT_BUDGET
) -> tuple[np.ndarray, np.ndarray]:
    """Similarities (n, k) in descending order and bank rows (n, k) of each query's k most similar rows.

    Q @ bank.T is formed for blocks of queries, at most `budget` bytes of float32 at a time, in the
    bank's dtype; torch does the products and the top-k when installed, numpy otherwise."""
    k = min(k, len(bank))
    step = max(1, budget // (4 * max(len(bank), 1)))
    sims, rows = np.empty((len(Q), k), bank.dtype), np.empty((len(Q), k), np.int64)
    try:
        import torch
    except ImportError:
        torch = None
    for a in range(0, len(Q), step):
        block = np.ascontiguousarray(Q[a : a + step], dtype=bank.dtype)
        if torch is not None:
            s, r = torch.topk(torch.from_numpy(block) @ torch.from_numpy(bank).T, k, dim=1)
            sims[a : a + step], rows[a : a + step] = s.numpy(), r.numpy()
            continue
        S = block @ bank.T
        part = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else np.broadcast_to(np.arange(k), S.shape)
        order = np.take_along_axis(-S, part, axis=1).argsort(axis=1, kind="stable")
        rows[a : a + step] = np.take_along_axis(part, order, axis=1)
        sims[a : a + step] = np.take_along_axis(S, rows[a : a + step], axis=1)
    return sims, rows


def vote_log_proba(sims: np.ndarray, labels: np.ndarray, k: int, n_classes: int, temperature: float) -> np.ndarray:
    """float64 log-probabilities (n, K) from the first k neighbours' similarities and labels."""
    n, k = len(sims), min(k, sims.shape[1])
    s = sims[:, :k].astype(np.float64)
    weights = np.exp((s - s[:, :1]) / temperature)  # exp(s / T) over its row's largest: no underflow to 0
    flat = (np.arange(n)[:, None] * n_classes + labels[:, :k]).ravel()
    votes = np.bincount(flat, weights=weights.ravel(), minlength=n * n_classes).reshape(n, n_classes)
    total = votes.sum(axis=1, keepdims=True)
    share = votes / np.where(total > 0, total, 1.0)
    share[total[:, 0] == 0] = 1.0 / n_classes  # no neighbour at all (an empty bank)
    smoothing = 1.0 / (k + 1)
    return np.log((1 - smoothing) * share + smoothing / n_classes)


@dataclass
class KNNFit:
    """The protocol's kNN fit at one k: a reference to the bank (shared by the grid, not copied)."""

    value: int
    bank: np.ndarray  # (N, D) float32 unit rows
    labels: np.ndarray  # (N,) encoded classes
    n_classes: int
    temperature: float
    budget: int = DEFAULT_BUDGET
    param = "k"
    n_iter = 0
    converged = True
    status = "exact"

    def log_proba(self, X: np.ndarray) -> np.ndarray:
        return log_proba_grid([self], X)[0]


def fit_knn(X: np.ndarray, y: np.ndarray, n_classes: int, ks: list[float], temperature: float, budget: int):
    """One `KNNFit` per k, all on the same bank."""
    bank = np.ascontiguousarray(X, dtype=np.float32)
    return [KNNFit(int(k), bank, y, n_classes, temperature, budget) for k in ks]


def log_proba_grid(fits: list[KNNFit], X: np.ndarray) -> list[np.ndarray]:
    """Every fit's log-probabilities on X from one search (the fits share their bank)."""
    first = fits[0]
    sims, rows = top_neighbours(X, first.bank, max(f.value for f in fits), first.budget)
    labels = first.labels[rows]
    return [vote_log_proba(sims, labels, f.value, f.n_classes, f.temperature) for f in fits]


def _real(value: Any) -> bool:
    """A real number (numpy scalars too), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


class _CosineHead(ClassifierMixin, BaseEstimator):
    """What both heads share: the preprocessing (`l2` or `center-l2`, fitted on the training rows)."""

    def _prepare(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.preprocess not in COSINE_PREPROCESSING:
            raise ValueError(
                f"The 'preprocess' parameter of {type(self).__name__} must be one of {COSINE_PREPROCESSING}. "
                f"Got {self.preprocess!r} instead."
            )
        if not (_real(self.temperature) and 0 < self.temperature < np.inf):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        self.preprocessor_ = Preprocessor(self.preprocess).fit(X)
        return self.preprocessor_.transform(X).astype(X.dtype, copy=False), codes

    def _transform(self, X: Any) -> np.ndarray:
        """Preprocessed rows, in the dtype of X: float64 input is compared in float64 (batch-invariant)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return self.preprocessor_.transform(X).astype(X.dtype, copy=False)

    def predict_proba(self, X: Any) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))


class NearestClassMean(LinearDecision, _CosineHead):
    """Nearest class mean by cosine: logits cos(x, m_c) / `temperature` on `preprocess`ed rows."""

    def __init__(self, temperature: float = 0.07, preprocess: str = "l2") -> None:
        self.temperature = temperature
        self.preprocess = preprocess

    def fit(self, X: Any, y: Any) -> NearestClassMean:
        Z, codes = self._prepare(X, y)
        if len(self.classes_) < 2:
            raise ValueError(f"needs samples of at least 2 classes, but the data has 1 class: {self.classes_[0]!r}")
        coef, intercept = class_means(Z, codes, len(self.classes_), self.temperature)
        self.coef_, self.intercept_ = coef.T.astype(Z.dtype), intercept.astype(Z.dtype)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        scores = self._transform(X) @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores


class CosineKNN(Described, _CosineHead):
    """Weighted kNN by cosine: the `n_neighbors` most similar training rows vote with exp(s / `temperature`).

    `max_memory` bounds the similarities held at once (bytes), by answering the queries in blocks;
    `offsets` (per class, or None) are added to the votes' log-probabilities and `calibration`
    divides them before a softmax (`pipeline.heads.posthoc`: logit adjustment, temperature)."""

    def __init__(
        self,
        n_neighbors: int = 20,
        temperature: float = 0.07,
        preprocess: str = "l2",
        max_memory: int = DEFAULT_BUDGET,
        calibration: float = 1.0,
        offsets: np.ndarray | None = None,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.preprocess = preprocess
        self.max_memory = max_memory
        self.calibration = calibration
        self.offsets = offsets

    def fit(self, X: Any, y: Any) -> CosineKNN:
        if isinstance(self.n_neighbors, bool) or not (isinstance(self.n_neighbors, Integral) and self.n_neighbors >= 1):
            raise ValueError(f"n_neighbors must be a positive integer, got {self.n_neighbors!r}")
        if not (_real(self.calibration) and 0 < self.calibration < np.inf):
            raise ValueError(f"calibration must be a positive temperature, got {self.calibration!r}")
        Z, codes = self._prepare(X, y)
        self.bank_, self.bank_labels_ = np.ascontiguousarray(Z), codes.astype(np.int64)
        return self

    @classmethod
    def from_bank(
        cls, preprocessor: Preprocessor, bank: np.ndarray, labels: np.ndarray, classes: np.ndarray, k: int, T: float
    ) -> CosineKNN:
        """A fitted head from its parts: preprocessed (unit) bank rows and their encoded classes."""
        head = cls(n_neighbors=int(k), temperature=float(T), preprocess=preprocessor.kind)
        head.preprocessor_, head.bank_, head.bank_labels_ = preprocessor, bank, labels
        head.classes_, head.n_features_in_ = np.asarray(classes), bank.shape[1]
        return head

    def predict_log_proba(self, X: Any) -> np.ndarray:
        Z = self._transform(X)
        fit = KNNFit(int(self.n_neighbors), self.bank_, self.bank_labels_, len(self.classes_), self.temperature,
                     int(self.max_memory))  # fmt: skip
        log_proba = fit.log_proba(Z)
        if self.calibration == 1.0 and self.offsets is None:
            return log_proba
        offsets = 0.0 if self.offsets is None else np.asarray(self.offsets, dtype=np.float64)
        return posthoc.apply(log_proba, self.calibration, offsets)

    def kneighbors_rows(self, X: Any) -> np.ndarray:
        """(n, k) bank rows of each query's k most similar rows, most similar first."""
        return top_neighbours(self._transform(X), self.bank_, int(self.n_neighbors), int(self.max_memory))[1]

    def predict(self, X: Any) -> np.ndarray:
        index = self.predict_log_proba(X).argmax(axis=1)
        return self.classes_[index]
